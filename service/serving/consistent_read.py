"""The memory's state as of one moment, read a piece at a time while writes go on.

A snapshot of a 1M-item memory takes seconds to write, and a state hash reads all of it:
neither may stop predictions or feedback for that long, and neither may copy the memory
whole. So a read registers itself on the memory (`Memory.before_write`): from then on the
first write to each slot saves that slot's rows as they were, and `pieces()` copies the
memory `rows` slots at a time under the memory lock, patched with the saved rows. A reader
of the memory waits at most one piece's copy, never the whole memory's.
"""

from __future__ import annotations

import threading

import torch

from ..core.memory import Memory


class ConsistentRead:
    """Create it under `lock` (the lock that guards the memory's writes); read `pieces()` to
    the end or `close()` it."""

    def __init__(self, memory: Memory, lock: threading.RLock, rows: int = 4096):
        self.memory, self.lock, self.rows = memory, lock, rows
        # entries without slot rows (counters): small, copied now
        self.fixed = {k: v.detach().clone() for k, v in memory.state_dict().items()
                      if not (v.dim() >= 1 and v.shape[0] == memory.capacity)}
        self.saved: dict[int, dict[str, torch.Tensor]] = {}  # slot -> its rows before the first write since
        memory.before_write.append(self._save)

    def _save(self, slots: torch.Tensor) -> None:
        tensors = None
        for s in slots.tolist():
            if s not in self.saved:
                tensors = tensors or self.memory.slot_tensors()
                self.saved[s] = {k: v.detach()[s].clone() for k, v in tensors.items()}

    def pieces(self):
        """The state_dict as of creation, as (name, tensor) pieces in `state_layout` order:
        per-slot entries `rows` slots at a time; on the CPU wherever the memory lives."""
        try:
            live = {k: v.detach() for k, v in self.memory.slot_tensors().items()}
            for name in self.memory.state_layout():
                if name in self.fixed:
                    yield name, self.fixed[name].cpu()
                    continue
                for start in range(0, self.memory.capacity, self.rows):
                    stop = min(start + self.rows, self.memory.capacity)
                    with self.lock:
                        piece = live[name][start:stop].to("cpu", copy=True)
                        for slot, before in self.saved.items():
                            if start <= slot < stop:
                                piece[slot - start] = before[name]
                    yield name, piece
        finally:
            self.close()

    def close(self) -> None:
        with self.lock:
            if self._save in self.memory.before_write:
                self.memory.before_write.remove(self._save)
