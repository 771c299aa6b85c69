"""GeneratorRewind: a seeded request's generator advances by its accepted tokens only.

In a verify step each of a seeded request's k + 1 rows draws its noise from the request's own
generator, in row order. Plain decoding would draw once per emitted token, so when a tokens are
accepted the generator must end where it is after the draw of row a - 1 (the row that made the
last accepted token), not after all k + 1 draws: then the next step's draw is the one plain
decoding would make next, and a seeded request makes the same tokens with and without
speculation (for the same logits).

The runner records, per input-batch slot, the generator's state after each of the slot's rows
(`record`, once per sampled row in row order) and moves the generator to the state after the
n-th row as the n-th token of the step reaches the slot (`on_append`; the engine appends a
step's tokens in rounds of unique slots). `start_step` forgets the previous step's records;
`forget` drops a slot whose sequence left the batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class GeneratorRewind:
    def __init__(self) -> None:
        # slot -> (its generator, states after each of its rows' draws, tokens appended since)
        self._pending: dict[int, tuple[torch.Generator, list[torch.Tensor], list[int]]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def start_step(self) -> None:
        self._pending.clear()

    def record(
        self,
        slots: list[int],
        generators: list[torch.Generator | None],
        states: dict[int, torch.Tensor] | None,
    ) -> None:
        """`slots[i]`, `generators[i]`: row i's slot and generator; `states[i]`: the generator's
        state after row i's draw (rows without their own generator have none)."""
        if not states:
            return
        for row in sorted(states):
            generator = generators[row]
            assert generator is not None
            entry = self._pending.get(slots[row])
            if entry is None or entry[0] is not generator:
                entry = (generator, [], [0])
                self._pending[slots[row]] = entry
            entry[1].append(states[row])

    def on_append(self, slots: Iterable[int]) -> None:
        """One token of this step reached each of `slots` (unique)."""
        if not self._pending:
            return
        for slot in slots:
            entry = self._pending.get(int(slot))
            if entry is None:
                continue
            generator, states, appended = entry
            if appended[0] < len(states):
                generator.set_state(states[appended[0]])
            appended[0] += 1

    def forget(self, slot: int) -> None:
        self._pending.pop(slot, None)
