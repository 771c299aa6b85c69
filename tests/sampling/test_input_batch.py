"""The runner's persistent InputBatch: gathering any slots in any order gives the SamplingBatch
that SamplingBatch.build makes from the same sequences' Python lists, field by field, under
random add / remove / append; plus slot reuse and the errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kestrel.runner import InputBatch
from kestrel.sample import SamplingBatch
from kestrel.sampling_params import SamplingParams

VOCAB = 24
EOS = (3, 7)

_floats_01 = st.sampled_from([1.0, 0.9, 0.5])
params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 1e-6, 0.7, 1.0, 1e39]),
    top_p=_floats_01,
    top_k=st.sampled_from([-1, 0, 1, 5, VOCAB, 10**12]),
    min_p=st.sampled_from([0.0, 0.1]),
    max_tokens=st.just(None),
    min_tokens=st.sampled_from([0, 0, 2, 5]),
    stop_token_ids=st.lists(st.integers(0, VOCAB - 1), max_size=2),
    ignore_eos=st.booleans(),
    repetition_penalty=st.sampled_from([1.0, 1.0, 1.3, 0.8, 1.0 + 1e-12, 1e39]),
    presence_penalty=st.sampled_from([0.0, 0.0, 0.5, -1.0]),
    frequency_penalty=st.sampled_from([0.0, 0.0, 0.25]),
    logprobs=st.sampled_from([None, None, 0, 3]),
    logit_bias=st.dictionaries(
        st.integers(0, VOCAB - 1), st.floats(-100, 100, allow_nan=False), max_size=3
    ),
)
# Token ids the engine's checks would reject (SamplingParams does not know the vocabulary).
bad_params_strategy = st.builds(
    SamplingParams,
    temperature=st.just(1.0),
    logit_bias=st.dictionaries(st.integers(VOCAB, VOCAB + 5), st.just(1.0), min_size=1),
) | st.builds(SamplingParams, stop_token_ids=st.just([VOCAB + 1]), min_tokens=st.just(1))


def _assert_same(got: SamplingBatch, want: SamplingBatch) -> None:
    for f in dataclasses.fields(SamplingBatch):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if isinstance(b, torch.Tensor) or isinstance(a, torch.Tensor):
            assert a is not None and b is not None, f.name
            assert a.dtype == b.dtype and a.shape == b.shape, f.name
            assert torch.equal(a, b), f.name
        elif f.name == "generators":
            assert len(a) == len(b) and all(x is y for x, y in zip(a, b)), f.name
        else:
            assert a == b, f.name


class _Model:
    """The Python lists that SamplingBatch.build reads, per live key."""

    def __init__(self) -> None:
        self.seqs: dict[int, tuple[SamplingParams, list[int], list[int], object]] = {}
        self.slot: dict[int, int] = {}

    def build(self, keys: list[int]) -> SamplingBatch:
        rows = [self.seqs[k] for k in keys]
        return SamplingBatch.build(
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            VOCAB,
            "cpu",
            [EOS] * len(rows),
        )


def _check_gather(batch: InputBatch, model: _Model, keys: list[int]) -> None:
    slots = [model.slot[k] for k in keys]
    try:
        want = model.build(keys)
    except ValueError as exc:
        with pytest.raises(ValueError) as info:
            batch.gather(slots)
        assert str(info.value) == str(exc)
        return
    _assert_same(batch.gather(slots), want)
    plain = all(
        p.is_greedy
        and p.logprobs is None
        and not p.logit_bias
        and p.min_tokens == 0
        and (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
        for p, *_ in (model.seqs[k] for k in keys)
    )
    assert batch.all_plain_greedy(slots) == plain
    assert batch.max_num_logprobs(slots) == want.max_num_logprobs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), max_num_seqs=st.integers(1, 6))
def test_gather_equals_build_under_random_operations(data, max_num_seqs):
    batch = InputBatch(max_num_seqs, VOCAB, "cpu")
    model = _Model()
    next_key = 0
    for _ in range(data.draw(st.integers(1, 40), label="num_ops")):
        op = data.draw(st.sampled_from(["add", "add", "remove", "append", "gather"]), label="op")
        live = sorted(model.seqs)
        if op == "add" and len(live) < max_num_seqs:
            bad = data.draw(st.integers(0, 9), label="bad") == 0
            params = data.draw(bad_params_strategy if bad else params_strategy, label="params")
            prompt = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8))
            # A re-add after preemption brings the tokens the sequence already has.
            output = data.draw(st.lists(st.integers(0, VOCAB - 1), max_size=4), label="output")
            generator = torch.Generator().manual_seed(next_key) if next_key % 2 else None
            slot = batch.add(next_key, params, prompt, generator, EOS, output)
            assert slot not in model.slot.values() and 0 <= slot < max_num_seqs
            model.seqs[next_key] = (params, prompt, list(output), generator)
            model.slot[next_key] = slot
            next_key += 1
        elif op == "remove" and live:
            key = data.draw(st.sampled_from(live), label="remove")
            assert batch.remove(key) == model.slot.pop(key)
            del model.seqs[key]
        elif op == "append" and live:
            keys = data.draw(st.lists(st.sampled_from(live), unique=True, min_size=1))
            tokens = data.draw(
                st.lists(st.integers(0, VOCAB - 1), min_size=len(keys), max_size=len(keys))
            )
            if len(keys) == 1 and data.draw(st.booleans(), label="single"):
                batch.append(model.slot[keys[0]], tokens[0])
            else:
                batch.append_tokens(np.array([model.slot[k] for k in keys]), np.array(tokens))
            for k, t in zip(keys, tokens):
                model.seqs[k][2].append(t)
        elif op == "gather" and live:
            keys = data.draw(st.permutations(live), label="order")
            keys = keys[: data.draw(st.integers(1, len(keys)), label="rows")]
            _check_gather(batch, model, keys)
        assert len(batch) == len(model.seqs)
        assert batch.num_free_slots == max_num_seqs - len(model.seqs)
        for k in model.seqs:
            assert batch.output_token_ids(model.slot[k]) == model.seqs[k][2]
    if model.seqs:
        _check_gather(batch, model, sorted(model.seqs, key=lambda k: -model.slot[k]))


def test_freed_slots_are_reused_lowest_first_after_the_latest_freed():
    batch = InputBatch(3, VOCAB, "cpu")
    assert [batch.add(k, SamplingParams(), [1]) for k in "abc"] == [0, 1, 2]
    assert batch.num_free_slots == 0
    assert batch.remove("b") == 1
    assert batch.add("d", SamplingParams(temperature=0), [2]) == 1
    batch.remove("a")
    batch.remove("c")
    assert batch.add("e", SamplingParams(), [1]) == 2  # the latest freed slot first
    assert batch.slot_of("d") == 1 and "a" not in batch and "e" in batch


def test_a_reused_slot_forgets_its_previous_sequence():
    batch = InputBatch(1, VOCAB, "cpu")
    generator = torch.Generator().manual_seed(1)
    heavy = SamplingParams(
        temperature=1.0,
        repetition_penalty=1.5,
        presence_penalty=1.0,
        logit_bias={4: 2.0},
        min_tokens=3,
        logprobs=2,
    )
    slot = batch.add("old", heavy, [5, 5, 6], generator, EOS, [9])
    batch.append(slot, 9)
    batch.remove("old")
    slot = batch.add("new", SamplingParams(temperature=0), [1, 2])
    assert batch.output_token_ids(slot) == []
    assert batch.all_plain_greedy([slot])
    want = SamplingBatch.build(
        [SamplingParams(temperature=0)], [[1, 2]], [[]], [None], VOCAB, "cpu"
    )
    _assert_same(batch.gather([slot]), want)
    # A penalized sequence in the reused slot starts from zero counts and its own prompt.
    batch.remove("new")
    slot = batch.add("pen", heavy, [1], None, EOS)
    want = SamplingBatch.build([heavy], [[1]], [[]], [None], VOCAB, "cpu", [EOS])
    _assert_same(batch.gather([slot]), want)


def test_errors_name_the_bad_key_or_slot():
    batch = InputBatch(2, VOCAB, "cpu")
    with pytest.raises(KeyError, match="sequence 'nope' holds no slot"):
        batch.remove("nope")
    batch.add("a", SamplingParams(), [1])
    with pytest.raises(ValueError, match="sequence 'a' already holds slot 0"):
        batch.add("a", SamplingParams(), [1])
    batch.add("b", SamplingParams(), [1])
    with pytest.raises(RuntimeError, match=r"all 2 slots of the input batch are in use"):
        batch.add("c", SamplingParams(), [1])
    batch.remove("a")
    with pytest.raises(KeyError, match="sequence 'a' holds no slot"):
        batch.remove("a")
    with pytest.raises(ValueError, match="slot 0 holds no sequence"):
        batch.gather([1, 0])
    with pytest.raises(ValueError, match="slot 0 holds no sequence"):
        batch.append(0, 5)
    with pytest.raises(IndexError, match=r"slot out of range \[0, 2\)"):
        batch.gather([2])
    with pytest.raises(ValueError, match="token per slot"):
        batch.append_tokens([1], [1, 2])
    batch.append(1, 4)
    for slots, tokens, message in (
        ([1, 0], [5, 6], "slot 0 holds no sequence"),
        ([1], [2**40], r"a token id lies outside \[0, 2147483647\]"),
    ):
        with pytest.raises(ValueError, match=message):  # all or nothing
            batch.append_tokens(slots, tokens)
        assert batch.output_token_ids(1) == [4]
    batch.add("p", SamplingParams(presence_penalty=1.0), [1])
    with pytest.raises(ValueError, match=r"a sampled token id lies outside \[0, 23\]"):
        batch.append_tokens([0, 1], [VOCAB, 1])
    assert batch.output_token_ids(0) == [] and batch.output_token_ids(1) == [4]
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="max_num_seqs"):
            InputBatch(bad, VOCAB, "cpu")


def test_a_failed_add_leaves_no_trace(monkeypatch):
    batch = InputBatch(1, VOCAB, "cpu")

    def boom(*args):
        raise RuntimeError("allocation failed")

    monkeypatch.setattr(batch, "_fill_penalty_row", boom)
    with pytest.raises(RuntimeError, match="allocation failed"):
        batch.add("a", SamplingParams(presence_penalty=1.0), [1])
    monkeypatch.undo()
    assert len(batch) == 0 and batch.num_free_slots == 1
    slot = batch.add("b", SamplingParams(temperature=0), [1])
    assert batch.all_plain_greedy([slot])


def test_penalty_state_grows_only_with_penalized_sequences():
    batch = InputBatch(8, VOCAB, "cpu")
    for k in range(3):
        batch.add(k, SamplingParams(), [1])
    assert batch.penalties.counts is None  # no dense [P, V] state without a penalty
    batch.add("p1", SamplingParams(frequency_penalty=0.5), [1])
    assert batch.penalties.counts is not None and batch.penalties.counts.shape == (1, VOCAB)
    batch.add("p2", SamplingParams(repetition_penalty=1.2), [2])
    batch.add("p3", SamplingParams(repetition_penalty=1.2), [2])
    assert batch.penalties.counts.shape == (4, VOCAB)
    batch.remove("p1")
    batch.add("p4", SamplingParams(presence_penalty=0.5), [2])  # reuses the freed row
    assert batch.penalties.counts.shape == (4, VOCAB)


def test_output_history_grows_past_its_first_capacity():
    batch = InputBatch(3, VOCAB, "cpu")
    want = {"a": [t % VOCAB for t in range(60)], "b": [], "c": [1] * 130}
    slots = {k: batch.add(k, SamplingParams(), [1], None, EOS, v) for k, v in want.items()}
    for step in range(150):
        keys = ["b"] if step < 20 else ["a", "b", "c"]  # b alone first, then all
        batch.append_tokens([slots[k] for k in keys], np.full(len(keys), step % VOCAB))
        for k in keys:
            want[k].append(step % VOCAB)
    for k, slot in slots.items():
        assert batch.output_token_ids(slot) == want[k]
