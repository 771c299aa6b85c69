"""InputBatch: the runner's persistent, slot-indexed sampling state of the running sequences.

A sequence gets a slot in [0, max_num_seqs) when it is first sampled (`add`), keeps it while it
runs, and gives it back when it finishes, fails, is aborted or is preempted (`remove`); freed
slots are reused (a stack: O(1) either way). Everything `SamplingBatch.build` derives from a
request's parameters is computed once, in `add`, and kept per slot; each sampled token updates
the slot in `append_tokens`. A step's rows are then a list of slots, and `gather(slots)` makes
the step's `SamplingBatch` with a few numpy fancy indexings and two host -> device copies (one
float32, one int64), equal field by field to `SamplingBatch.build` on the same sequences.

Per slot, on the host (numpy, [max_num_seqs] unless noted):
  _columns        [7, N] float32  temperature, top_p, min_p, repetition, presence and frequency
                                  penalty, top_k (its int32 bit pattern, so one copy moves all)
  _min_tokens, _num_logprobs (-1 = none), _num_output   int64
  flags           bool   live, greedy, plain greedy, filters, repetition / additive penalty, bias
  _tokens         [N, C] int32  the output token history; C grows by doubling to the longest
                                output, so N * C * 4 bytes (256 slots x 32k tokens = 32 MiB)
  per-slot lists  generator, logit-bias ids and values, banned ids (stop + EOS, for min_tokens)
On the device, only once some sequence uses a penalty: `PenaltyRows` (runner/penalty_rows.py),
  a [P, V] int32 output-count row and a [P, V] bool prompt-mask row per penalized slot
  (`_penalty_row`), P * V * 5 bytes for the most penalized sequences alive at once (256 of a
  152k vocabulary: 195 MB). `gather` adds the [S, V] tensors of the step that `build` made.

The parameters are read once, in `add`: a SamplingParams changed afterwards is not seen.
Errors that `build` raises for a row while sampling (a user token id outside the vocabulary)
are found in `add` and raised by `gather` for that row, with the same message, so the runner's
row-by-row retry still pins them on their sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from kestrel.runner.penalty_rows import PenaltyRows
from kestrel.sample.batch import SamplingBatch
from kestrel.sampling_params import GREEDY_TEMPERATURE_EPS, SamplingParams

if TYPE_CHECKING:
    from kestrel.spec.draft_rows import DraftRows

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT64_MAX = int(np.iinfo(np.int64).max)
_INT32_MAX = int(np.iinfo(np.int32).max)
_TEMPERATURE, _TOP_P, _MIN_P, _REPETITION, _PRESENCE, _FREQUENCY, _TOP_K = range(7)
_NUM_COLUMNS = 7
_HISTORY_COLUMNS = 64  # first output-history capacity per slot, grown by doubling
_SCALAR_APPEND_ROWS = 4  # append_tokens loops in Python up to this many rows (cheaper there)
_NO_IDS = np.zeros(0, dtype=np.int64)
_NO_VALUES = np.zeros(0, dtype=np.float32)

ToDevice = Callable[[np.ndarray], torch.Tensor]


class InputBatch:
    """Sampling state of up to `max_num_seqs` sequences, each in one slot (see the module)."""

    def __init__(self, max_num_seqs: int, vocab_size: int, device: torch.device | str) -> None:
        if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs = {max_num_seqs!r} is invalid; allowed: an int >= 1")
        if vocab_size < 1:
            raise ValueError(f"vocab_size = {vocab_size} is invalid; allowed: an int >= 1")
        n = max_num_seqs
        self.max_num_seqs = n
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._slot_of: dict[Hashable, int] = {}
        self._free: list[int] = list(range(n - 1, -1, -1))  # a stack; pop() = lowest slot first
        self._live = np.zeros(n, dtype=bool)
        self._columns = np.zeros((_NUM_COLUMNS, n), dtype=np.float32)
        self._top_k = self._columns[_TOP_K].view(np.int32)  # int32 view of the top_k row
        self._min_tokens = np.zeros(n, dtype=np.int64)
        self._num_logprobs = np.full(n, -1, dtype=np.int64)
        self._num_output = np.zeros(n, dtype=np.int64)  # 0 for free slots
        self._tokens = np.zeros((n, _HISTORY_COLUMNS), dtype=np.int32)
        self._longest = 0  # >= every slot's output length (made exact when it passes C)
        self._greedy = np.zeros(n, dtype=bool)
        self._plain_greedy = np.zeros(n, dtype=bool)  # argmax of the raw logits is the whole job
        self._filters = np.zeros(n, dtype=bool)  # top_k, top_p < 1 or min_p > 0
        self._uses_rep = np.zeros(n, dtype=bool)  # repetition_penalty != 1
        self._uses_add = np.zeros(n, dtype=bool)  # presence or frequency penalty != 0
        self._has_bias = np.zeros(n, dtype=bool)
        self._generators: list[torch.Generator | None] = [None] * n
        self._bias_ids: list[np.ndarray] = [_NO_IDS] * n  # [B_slot] int64, dict order
        self._bias_values: list[np.ndarray] = [_NO_VALUES] * n  # [B_slot] float32
        self._banned_ids: list[np.ndarray] = [_NO_IDS] * n  # sorted stop + EOS ids
        self._id_errors: dict[int, str] = {}  # slot -> build's message after "row i: "
        self._count_errors: dict[int, str] = {}  # slot -> build's token-count message
        self._num_not_plain = 0  # live slots that are not plain greedy
        self._penalty_row = np.full(n, -1, dtype=np.int64)  # slot -> row of penalties, or -1
        self.penalties = PenaltyRows(n, vocab_size, self.device)

    # ---- membership --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slot_of

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def slot_of(self, key: Hashable) -> int:
        slot = self._slot_of.get(key)
        if slot is None:
            raise KeyError(f"sequence {key!r} holds no slot of the input batch")
        return slot

    def add(
        self,
        key: Hashable,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        generator: torch.Generator | None = None,
        eos_token_ids: Sequence[int] = (),
        output_ids: Sequence[int] = (),
    ) -> int:
        """Gives sequence `key` a slot and returns it. `output_ids` are tokens it already has
        (a sequence re-added after preemption). Raises ValueError for a key already present,
        RuntimeError when every slot is taken."""
        if key in self._slot_of:
            raise ValueError(f"sequence {key!r} already holds slot {self._slot_of[key]}")
        if not self._free:
            raise RuntimeError(
                f"all {self.max_num_seqs} slots of the input batch are in use (max_num_seqs = "
                f"{self.max_num_seqs}); remove a sequence before adding {key!r}"
            )
        slot = self._free.pop()
        try:
            self._fill(slot, params, prompt_ids, generator, eos_token_ids, output_ids)
        except BaseException:
            self._clear(slot)
            self._free.append(slot)
            raise
        self._slot_of[key] = slot
        return slot

    def remove(self, key: Hashable) -> int:
        """Frees the slot of `key` (KeyError when it holds none) and returns it."""
        slot = self._slot_of.pop(key, None)
        if slot is None:
            raise KeyError(f"sequence {key!r} holds no slot of the input batch")
        self._clear(slot)
        self._free.append(slot)
        return slot

    def _fill(
        self,
        slot: int,
        p: SamplingParams,
        prompt_ids: Sequence[int],
        generator: torch.Generator | None,
        eos_token_ids: Sequence[int],
        output_ids: Sequence[int],
    ) -> None:
        # The same per-value normalization as SamplingBatch.build (see there): clamp the
        # unbounded floats to the largest float32 and top_k to [0, V]; flags come from the
        # Python values (not the float32 ones) as build's do.
        col = self._columns
        col[_TEMPERATURE, slot] = min(p.temperature, _FLOAT32_MAX)
        col[_TOP_P, slot] = p.top_p
        col[_MIN_P, slot] = p.min_p
        col[_REPETITION, slot] = min(p.repetition_penalty, _FLOAT32_MAX)
        col[_PRESENCE, slot] = p.presence_penalty
        col[_FREQUENCY, slot] = p.frequency_penalty
        self._top_k[slot] = min(max(p.top_k, 0), self.vocab_size)
        self._min_tokens[slot] = min(p.min_tokens, _INT64_MAX)
        self._num_logprobs[slot] = -1 if p.logprobs is None else min(p.logprobs, _INT64_MAX)
        greedy = p.temperature < GREEDY_TEMPERATURE_EPS
        uses_rep = p.repetition_penalty != 1.0
        uses_add = p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        plain = (
            greedy
            and p.logprobs is None
            and not p.logit_bias
            and p.min_tokens == 0
            and not uses_rep
            and not uses_add
        )
        self._greedy[slot] = greedy
        self._plain_greedy[slot] = plain
        self._filters[slot] = p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0
        self._uses_rep[slot] = uses_rep
        self._uses_add[slot] = uses_add
        self._has_bias[slot] = bool(p.logit_bias)
        self._generators[slot] = generator
        if p.logit_bias:
            self._bias_ids[slot] = np.fromiter(p.logit_bias.keys(), np.int64, len(p.logit_bias))
            self._bias_values[slot] = np.array(list(p.logit_bias.values()), dtype=np.float32)
        banned = set(p.stop_token_ids)
        if not p.ignore_eos:
            banned.update(eos_token_ids)
        self._banned_ids[slot] = np.array(sorted(banned), dtype=np.int64)
        self._check_user_token_ids(slot, p)
        self._store_history(slot, output_ids)
        self._live[slot] = True
        if not plain:
            self._num_not_plain += 1
        if uses_rep or uses_add:
            self._fill_penalty_row(slot, uses_rep, prompt_ids, output_ids)

    def _check_user_token_ids(self, slot: int, p: SamplingParams) -> None:
        vocab = self.vocab_size
        for name, ids in (
            ("logit_bias", p.logit_bias.keys()),
            ("stop_token_ids", p.stop_token_ids),
        ):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                allowed = f"[0, {vocab - 1}] (vocab_size = {vocab})"
                self._id_errors[slot] = f"{name} has token id {bad[0]}; allowed: {allowed}"
                return

    def _store_history(self, slot: int, output_ids: Sequence[int]) -> None:
        num = len(output_ids)
        if num > self._tokens.shape[1]:
            self._grow_history(num)
        if num:
            self._tokens[slot, :num] = np.asarray(output_ids, dtype=np.int64)
        self._num_output[slot] = num
        self._longest = max(self._longest, num)

    def _fill_penalty_row(
        self, slot: int, uses_rep: bool, prompt_ids: Sequence[int], output_ids: Sequence[int]
    ) -> None:
        outputs = np.asarray(output_ids, dtype=np.int64)
        prompt = np.asarray(prompt_ids, dtype=np.int64) if uses_rep else _NO_IDS
        if not (self.penalties.in_vocab(outputs) and self.penalties.in_vocab(prompt)):
            self._count_errors[slot] = (
                f"a prompt or output token id lies outside [0, {self.vocab_size - 1}]"
            )
            outputs = prompt = _NO_IDS  # the slot can never be gathered: keep its row empty
        self._penalty_row[slot] = self.penalties.take(prompt, outputs)

    def _clear(self, slot: int) -> None:
        if self._live[slot] and not self._plain_greedy[slot]:
            self._num_not_plain -= 1
        self._live[slot] = False
        row = int(self._penalty_row[slot])
        if row >= 0:
            self.penalties.release(row)
            self._penalty_row[slot] = -1
        self._generators[slot] = None
        self._bias_ids[slot] = _NO_IDS
        self._bias_values[slot] = _NO_VALUES
        self._banned_ids[slot] = _NO_IDS
        self._id_errors.pop(slot, None)
        self._count_errors.pop(slot, None)
        self._num_output[slot] = 0
        self._plain_greedy[slot] = False

    # ---- tokens ------------------------------------------------------------------------------

    def append(self, slot: int, token: int) -> None:
        """One new output token of the sequence in `slot`."""
        self.append_tokens([slot], [token])

    def append_tokens(
        self, slots: Sequence[int] | np.ndarray, tokens: Sequence[int] | np.ndarray
    ) -> None:
        """One new output token per slot (`slots` unique, live): the history, the output length
        and, for penalized slots, the token counts (one scatter on the device). Called once per
        step: a few numpy calls (a Python loop for a handful of rows, which is cheaper there);
        the penalty work only while some live slot has a penalty. All or nothing on errors."""
        toks = np.asarray(tokens)
        if toks.ndim != 1 or len(slots) != toks.shape[0] or toks.dtype.kind not in "iu":
            raise ValueError(
                f"append_tokens needs one integer token per slot; got {len(slots)} slots and "
                f"tokens of shape {toks.shape}, dtype {toks.dtype}"
            )
        # The history is int32: wider arrays are checked (the engine's are int32 already).
        if toks.dtype != np.int32 and toks.size and not _fits_int32(toks):
            raise ValueError(f"a token id lies outside [0, {_INT32_MAX}]")
        scatter = None
        penalized = self.penalties.num_taken > 0
        if len(slots) <= _SCALAR_APPEND_ROWS and not penalized:
            self._append_few(slots.tolist() if isinstance(slots, np.ndarray) else slots, toks)
        else:
            idx = np.asarray(slots, dtype=np.int64)
            self._check_live(idx)
            if penalized:
                scatter = self._penalty_scatter(idx, toks)
            self._append_many(idx, toks)
        if scatter is not None:
            self.penalties.count(*scatter)

    def _append_few(self, slots: Sequence[int], toks: np.ndarray) -> None:
        live, num = self._live, self._num_output
        for slot in slots:
            if not 0 <= slot < self.max_num_seqs or not live[slot]:
                raise ValueError(f"slot {slot!r} holds no sequence")
        for slot, token in zip(slots, toks.tolist()):
            k = int(num[slot])
            if k >= self._tokens.shape[1]:
                self._grow_history(k + 1)
            self._tokens[slot, k] = token
            num[slot] = k + 1
            self._longest = max(self._longest, k + 1)

    def _append_many(self, idx: np.ndarray, toks: np.ndarray) -> None:
        if idx.size == 0:
            return
        pos = self._num_output[idx]
        self._longest += 1  # each slot grows by one at most
        if self._longest > self._tokens.shape[1]:
            self._longest = int(self._num_output.max()) + 1  # exact again (free slots hold 0)
            if self._longest > self._tokens.shape[1]:
                self._grow_history(self._longest)
        self._tokens[idx, pos] = toks
        self._num_output[idx] = pos + 1

    def _grow_history(self, need: int) -> None:
        cols = self._tokens.shape[1]
        while cols < need:
            cols *= 2
        grown = np.zeros((self.max_num_seqs, cols), dtype=np.int32)
        grown[:, : self._tokens.shape[1]] = self._tokens
        self._tokens = grown

    def _penalty_scatter(
        self, idx: np.ndarray, toks: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(penalty rows, token ids) of the penalized slots' new tokens, checked; or None."""
        rows = self._penalty_row[idx]
        penalized = rows >= 0
        if not penalized.any():
            return None
        ids = toks[penalized].astype(np.int64)
        if not self.penalties.in_vocab(ids):
            raise ValueError(f"a sampled token id lies outside [0, {self.vocab_size - 1}]")
        return rows[penalized], ids

    def output_token_ids(self, slot: int) -> list[int]:
        """The slot's output tokens so far (a copy)."""
        self._check_live(np.asarray([slot], dtype=np.int64))
        return self._tokens[slot, : self._num_output[slot]].tolist()

    # ---- the step ----------------------------------------------------------------------------

    def all_plain_greedy(self, slots: Sequence[int] | np.ndarray) -> bool:
        """Whether every row of `slots` takes the argmax of its raw logits (no edits, no
        logprobs): O(1) when every live slot is plain greedy."""
        if self._num_not_plain == 0:
            return True
        return bool(self._plain_greedy[np.asarray(slots, dtype=np.int64)].all())

    def max_num_logprobs(self, slots: Sequence[int] | np.ndarray) -> int:
        idx = np.asarray(slots, dtype=np.int64)
        return int(self._num_logprobs[idx].max()) if idx.size else -1

    def gather(
        self,
        slots: Sequence[int] | np.ndarray,
        to_device: ToDevice | None = None,
        drafts: DraftRows | None = None,
    ) -> SamplingBatch:
        """The SamplingBatch whose row i is the sequence in `slots[i]`. `to_device` copies a
        numpy array to the batch's device (the runner passes its pinned stager). `drafts`
        (speculation, `kestrel.spec.draft_rows`): row i's sequence is taken to have output
        `drafts_before(i)` beyond its history (penalty counts and the min_tokens ban see them),
        as `SamplingBatch.build` with those drafts appended to the row's output ids."""
        idx = np.asarray(slots, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"slots must be one-dimensional, got shape {idx.shape}")
        num_rows = int(idx.shape[0])
        self._check_live(idx)
        self._raise_row_errors(idx)
        copy = to_device if to_device is not None else self._copy_to_device
        greedy = self._greedy[idx]
        random_pos = np.flatnonzero(~greedy)
        uses_rep = self._uses_rep[idx]
        use_rep = bool(uses_rep.any())
        use_add = bool(self._uses_add[idx].any())
        bias_rows, bias_ids, bias_values = self._bias_entries(idx)
        offsets = drafts.offsets if drafts is not None else None
        banned_rows, banned_ids = self._banned_entries(idx, offsets)
        pen_pos = np.flatnonzero(uses_rep | self._uses_add[idx]) if use_rep or use_add else _NO_IDS
        rep_pos = np.flatnonzero(uses_rep) if use_rep else _NO_IDS

        # One int64 copy: every index list of the batch, then views into it.
        parts = [
            random_pos,
            bias_rows,
            bias_ids,
            banned_rows,
            banned_ids,
            pen_pos,
            self._penalty_row[idx[pen_pos]],
            rep_pos,
            self._penalty_row[idx[rep_pos]],
            *self._draft_pairs(idx, drafts, use_rep or use_add),
        ]
        longs = _split(copy(np.concatenate(parts)), [p.shape[0] for p in parts])
        # One float32 copy: the [7, S] columns of the rows, then the logit-bias values.
        floats = copy(np.concatenate([self._columns[:, idx].reshape(-1), bias_values]))
        columns = floats[: _NUM_COLUMNS * num_rows].view(_NUM_COLUMNS, num_rows)

        counts = prompt_mask = None
        if use_rep or use_add:
            pen = self.penalties
            counts = pen.dense(pen.counts, num_rows, longs[5], longs[6])
            if longs[9].shape[0]:  # the drafts before each penalized row count as its output
                ones = torch.ones(longs[9].shape[0], dtype=counts.dtype, device=counts.device)
                counts.index_put_((longs[9], longs[10]), ones, accumulate=True)
            if use_rep:
                prompt_mask = pen.dense(pen.prompt_seen, num_rows, longs[7], longs[8])

        def optional(t: torch.Tensor) -> torch.Tensor | None:
            return t if t.shape[0] else None

        random_row_ids = random_pos.tolist()
        num_logprobs = self._num_logprobs[idx]
        return SamplingBatch(
            temperature=columns[_TEMPERATURE],
            top_p=columns[_TOP_P],
            top_k=columns[_TOP_K].view(torch.int32),
            min_p=columns[_MIN_P],
            repetition_penalty=columns[_REPETITION],
            presence_penalty=columns[_PRESENCE],
            frequency_penalty=columns[_FREQUENCY],
            output_token_counts=counts,
            prompt_token_mask=prompt_mask,
            logit_bias_rows=optional(longs[1]),
            logit_bias_ids=optional(longs[2]),
            logit_bias_values=floats[_NUM_COLUMNS * num_rows :] if bias_values.size else None,
            banned_rows=optional(longs[3]),
            banned_ids=optional(longs[4]),
            random_rows=optional(longs[0]),
            random_row_ids=random_row_ids,
            generators=[self._generators[s] for s in idx.tolist()],
            vocab_size=self.vocab_size,
            max_num_logprobs=int(num_logprobs.max()) if num_rows else -1,
            all_greedy=not random_row_ids,
            use_repetition_penalty=use_rep,
            use_additive_penalties=use_add,
            use_filters=bool(self._filters[idx[random_pos]].any()),
        )

    def _copy_to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def _check_live(self, idx: np.ndarray) -> None:
        """Every slot of `idx` in range and live (two numpy reductions: it runs every step)."""
        if idx.size == 0:
            return
        try:
            live = self._live[idx]
        except IndexError:
            live = None
        if live is None or int(idx.min()) < 0:
            raise IndexError(f"slot out of range [0, {self.max_num_seqs}): {idx.tolist()}")
        if not live.all():
            raise ValueError(f"slot {int(idx[~live][0])} holds no sequence")

    def _raise_row_errors(self, idx: np.ndarray) -> None:
        """The ValueErrors SamplingBatch.build would raise for these rows, in its order."""
        if self._id_errors:
            for row, slot in enumerate(idx.tolist()):
                message = self._id_errors.get(slot)
                if message is not None:
                    raise ValueError(f"row {row}: {message}")
        if self._count_errors:
            for slot in idx.tolist():
                message = self._count_errors.get(slot)
                if message is not None:
                    raise ValueError(message)

    def _bias_entries(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.flatnonzero(self._has_bias[idx])
        if pos.size == 0:
            return _NO_IDS, _NO_IDS, _NO_VALUES
        slots = idx[pos].tolist()
        ids = [self._bias_ids[s] for s in slots]
        rows = np.repeat(pos, [a.shape[0] for a in ids])
        values = np.concatenate([self._bias_values[s] for s in slots])
        return rows, np.concatenate(ids), values

    def _draft_pairs(
        self, idx: np.ndarray, drafts: DraftRows | None, penalized: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """(row, draft id) pairs of the penalized rows (see `gather`), checked against V."""
        if drafts is None or not penalized:
            return _NO_IDS, _NO_IDS
        if drafts.num_rows != idx.shape[0]:
            raise ValueError(f"drafts describe {drafts.num_rows} rows, the step has {idx.shape[0]}")
        keep = (self._uses_rep | self._uses_add)[idx[drafts.pair_rows]]
        ids = drafts.pair_ids[keep]
        if not self.penalties.in_vocab(ids):
            raise ValueError(f"a draft token id lies outside [0, {self.vocab_size - 1}]")
        return drafts.pair_rows[keep], ids

    def _banned_entries(
        self, idx: np.ndarray, offsets: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows still under min_tokens ban their stop + EOS ids (`offsets`: drafts before
        each row, counted as output)."""
        num_output = self._num_output[idx]
        if offsets is not None:
            num_output = num_output + offsets
        pos = np.flatnonzero(num_output < self._min_tokens[idx])
        if pos.size == 0:
            return _NO_IDS, _NO_IDS
        ids = [self._banned_ids[s] for s in idx[pos].tolist()]
        rows = np.repeat(pos, [a.shape[0] for a in ids])
        return rows, np.concatenate(ids)


def _fits_int32(ids: np.ndarray) -> bool:
    return int(ids.min()) >= 0 and int(ids.max()) <= _INT32_MAX


def _split(flat: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    out, start = [], 0
    for n in lengths:
        out.append(flat[start : start + n])
        start += n
    return out
