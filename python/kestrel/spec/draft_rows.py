"""DraftRows: which drafts each sampled row of a verify step assumes were accepted.

A drafted request's k + 1 sampled rows are consecutive in `logits_indices` and share one input
batch slot: row i (0..k) has as input its last known token (i = 0) or draft i - 1, and predicts
the token after it. Row i is only ever used when drafts 0..i-1 are all accepted, so its target
distribution is the one plain sampling would use after those i tokens: penalties count them as
output tokens, min_tokens sees an output i tokens longer. `DraftRows` holds that per row:

  offsets     [S] int64   i: the drafts before the row (0 for every row of a plain request)
  pair_rows   [P] int64   sampled row of each (row, earlier draft) pair, P = sum of offsets
  pair_ids    [P] int64   the draft token of the pair

It is built on the host from the step's own arrays (the slots repeat for a drafted request;
two different sequences never share a slot in one step), with no per-token Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DraftRows:
    offsets: np.ndarray  # [S] int64
    pair_rows: np.ndarray  # [P] int64
    pair_ids: np.ndarray  # [P] int64

    @property
    def num_rows(self) -> int:
        return int(self.offsets.shape[0])

    @classmethod
    def from_step(
        cls,
        slots: Sequence[int] | np.ndarray,
        input_ids: np.ndarray,
        logits_indices: np.ndarray,
    ) -> DraftRows | None:
        """From a step's sampled slots (in `logits_indices` order), its `input_ids` [T] and
        `logits_indices` [S]; None when no slot repeats (no row assumes a draft)."""
        slot_arr = np.asarray(slots, dtype=np.int64)
        num_rows = int(slot_arr.shape[0])
        if num_rows != int(logits_indices.shape[0]):
            raise ValueError(f"{num_rows} slots for {logits_indices.shape[0]} logits indices")
        if num_rows < 2 or not (slot_arr[1:] == slot_arr[:-1]).any():
            return None
        row_inputs = np.asarray(input_ids)[np.asarray(logits_indices)].astype(np.int64)
        return cls.from_runs(slot_arr, row_inputs)

    @classmethod
    def from_runs(cls, run_keys: np.ndarray, row_inputs: np.ndarray) -> DraftRows:
        """`run_keys` [S]: equal consecutive keys are the rows of one request; `row_inputs` [S]:
        each row's input token (row i > 0 of a run: draft i - 1)."""
        num_rows = int(run_keys.shape[0])
        starts_run = np.ones(num_rows, dtype=bool)
        starts_run[1:] = run_keys[1:] != run_keys[:-1]
        run_start = np.maximum.accumulate(np.where(starts_run, np.arange(num_rows), 0))
        offsets = np.arange(num_rows, dtype=np.int64) - run_start  # [S]
        # Row r with offset i pairs with the inputs of rows r - i + 1 .. r (drafts 0 .. i - 1).
        pair_rows = np.repeat(np.arange(num_rows, dtype=np.int64), offsets)  # [P]
        group_start = np.repeat(np.cumsum(offsets) - offsets, offsets)
        within = np.arange(pair_rows.shape[0], dtype=np.int64) - group_start  # 0 .. i - 1
        sources = pair_rows - offsets[pair_rows] + 1 + within
        return cls(offsets, pair_rows, np.asarray(row_inputs, dtype=np.int64)[sources])

    def row(self, i: int) -> DraftRows:
        """Row i alone (a one-row step: the runner's row-by-row sampling retry)."""
        keep = self.pair_rows == i
        return DraftRows(
            self.offsets[i : i + 1], np.zeros(int(keep.sum()), np.int64), self.pair_ids[keep]
        )

    def drafts_before(self, row: int) -> list[int]:
        """The drafts row `row` assumes accepted, in order (for tests and messages)."""
        return self.pair_ids[self.pair_rows == row].tolist()
