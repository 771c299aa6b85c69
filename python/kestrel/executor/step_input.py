"""StepInput: what the model runner needs of one scheduler step, as plain numpy arrays and ints.

The scheduler's `SchedulerOutput` is a native object whose arrays are views into the scheduler's
buffers (valid until the next `schedule()`); a StepInput holds the same arrays under the same
names, so it pickles (a multi-process executor can broadcast it to its workers) and the runner
reads either. `copy()` detaches it from the scheduler's buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class StepInput:
    input_ids: np.ndarray  # [num_tokens] int32/64: this step's token ids
    positions: np.ndarray  # [num_tokens]: their positions in their sequences
    slot_mapping: np.ndarray  # [num_tokens] int64: KV slot of each token (negative = skip)
    query_start_loc: np.ndarray  # [num_reqs + 1] int32: request i owns rows [qsl[i], qsl[i+1])
    seq_lens: np.ndarray  # [num_reqs] int32: context length incl. this step's tokens
    block_tables: np.ndarray  # [num_reqs, max_blocks_per_seq] int32
    logits_indices: np.ndarray  # [num_sampled]: rows whose logits are sampled
    num_decodes: int  # the first num_decodes requests have one query token
    max_query_len: int
    max_seq_len: int
    max_blocks_per_seq: int
    # Async scheduling: rows whose token is the one the previous step samples for their request
    # (input_ids holds 0 there) and that token's row among the previous step's sampled rows.
    placeholder_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    placeholder_src: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))

    @property
    def num_reqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_sampled(self) -> int:
        return int(self.logits_indices.shape[0])

    @classmethod
    def from_scheduler_output(cls, out: Any) -> StepInput:
        """The step's arrays (views, no copy) and sizes from a `_core.SchedulerOutput`."""
        return cls(**{f.name: getattr(out, f.name) for f in fields(cls)})

    def copy(self) -> StepInput:
        """A StepInput owning its arrays (safe to keep past the next schedule())."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return StepInput(
            **{k: v.copy() if isinstance(v, np.ndarray) else v for k, v in values.items()}
        )
