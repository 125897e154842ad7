"""Account for what autograd keeps for backward: the memory rule made measurable."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch


@dataclass
class SavedTensors:
    """Tensors autograd saved while a function ran, parameters excluded."""

    tensors: list[torch.Tensor] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Bytes of distinct storages saved (a tensor saved twice counts once)."""
        seen, total = set(), 0
        for t in self.tensors:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        return total

    def describe(self) -> list[str]:
        return [f"{tuple(t.shape)} {t.dtype}" for t in self.tensors]


def saved_activations(
    fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()
) -> tuple[object, SavedTensors]:
    """Run `fn()` and collect what autograd saves, skipping storages of `exclude`.

    Pass the module's parameters (and any frozen weights) as `exclude`: they live
    anyway, so only activations count, as in docs/design.md's memory rule.
    """
    excluded = {(t.untyped_storage().data_ptr(), t.device) for t in exclude}
    saved = SavedTensors()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if (t.untyped_storage().data_ptr(), t.device) not in excluded:
            saved.tensors.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, saved
