"""DoRA's weight norm n = ||W + s B A|| per output row, without an [N, K] temporary.

peft forms W + s B A (through an identity matrix) every forward and takes its row
norms. Expanding the square needs only skinny products:

    ||W_n + s B_n A||^2 = ||W_n||^2 + 2 s B_n . (W A^T)_n + s^2 B_n (A A^T) B_n^T

W is frozen, so ||W_n||^2 [N] is computed once and cached (`WeightNormCache`); W A^T
[N, R] is one skinny pass over W per forward (not cached across forwards: A changes
every optimizer step, and an update written through `A.data` would not show in its
version counter); A A^T is [R, R]. Everything accumulates in float32 (float64 for a
float64 W). The direct form, for the tests and for the rows below, is
`reference.dora_weight_norm_reference`.

Cancellation: the sum's rounding error is about eps * T with T = ||W_n||^2 +
||s B_n A||^2, so where W_n + s B_n A nearly cancels (n^2 << T) the identity loses
bits that the direct form keeps. Rows with n^2 < T / 4 (at most two bits lost) are
recomputed directly, from their own rows of W and B only; in DoRA training they are
rare (n^2 >= T / 2 whenever the angle between W_n and s B_n A is at most 120
degrees).
"""

from __future__ import annotations

import weakref

import torch

from .contract import accumulation_dtype

# Rows whose n^2 falls below this fraction of ||W_n||^2 + ||s B_n A||^2 are recomputed
# directly: the identity's error is about eps * T / n^2 relative to n^2.
CANCELLATION_RATIO = 0.25
# Rows of W cast to the accumulation dtype at a time (a bounded temporary, 16 MiB of
# float32), where W is narrower than the accumulation dtype.
_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(weight: torch.Tensor):
    """W's rows in the accumulation dtype, in blocks of bounded size (W itself when it
    already has that dtype)."""
    acc = accumulation_dtype(weight.dtype)
    if weight.dtype == acc:
        yield weight
        return
    rows = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[1]))
    for block in weight.split(rows):
        yield block.to(acc)


@torch.no_grad()
def squared_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W_n||^2 [N] in the accumulation dtype, for W [N, K]."""
    acc = accumulation_dtype(weight.dtype)
    parts = [torch.linalg.vector_norm(block, dim=1).square() for block in _row_chunks(weight)]
    return torch.cat(parts) if parts else weight.new_zeros(0, dtype=acc)


@torch.no_grad()
def _weight_times_A(weight: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """W A^T [N, R] in the accumulation dtype."""
    A = lora_A.to(accumulation_dtype(weight.dtype))
    return torch.cat([block @ A.t() for block in _row_chunks(weight)])


class WeightNormCache:
    """||W_n||^2 of one frozen weight, recomputed when the weight changes.

    The entry is keyed on the weight tensor itself (a weak reference: a new Parameter
    put in its place misses), its version counter (every in-place write: `copy_`,
    `load_state_dict`, a merge), its data pointer (`weight.data = ...`), shape, strides
    and dtype. A write through `weight.data.<op>_()` bumps no version counter (torch
    gives `.data` a fresh one): call `clear()` after one. Inference tensors, which have
    no version counter, and meta tensors are never cached.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._weight_ref: weakref.ref | None = None
        self._value: torch.Tensor | None = None

    def clear(self) -> None:
        self._key = self._weight_ref = self._value = None

    @staticmethod
    def _key_of(weight: torch.Tensor) -> tuple | None:
        if weight.is_inference() or weight.device.type == "meta":
            return None
        return (
            weight._version,
            weight.data_ptr(),
            tuple(weight.shape),
            weight.stride(),
            weight.dtype,
            weight.device,
        )

    def squared_row_norms(
        self, weight: torch.Tensor, stored: torch.Tensor | None = None
    ) -> torch.Tensor:
        """||W_n||^2 [N] in the accumulation dtype, from the cache when W is unchanged.

        `stored` is the tensor W is kept as, when `weight` is a dense copy of it (a
        bitsandbytes 4-bit `Params4bit`, dequantized into a reused workspace): the
        entry is keyed on `stored` then, and its value computed from `weight`.
        """
        stored = weight if stored is None else stored
        key = self._key_of(stored)
        if key is None:
            return squared_row_norms(weight)
        if (
            self._value is not None
            and self._key == key
            and self._weight_ref is not None
            and self._weight_ref() is stored
        ):
            return self._value
        value = squared_row_norms(weight)
        self._key, self._weight_ref, self._value = key, weakref.ref(stored), value
        return value

    def __getstate__(self) -> dict:
        # A weak reference cannot be pickled (torch.save of a whole module); the entry is
        # recomputed after loading anyway.
        return {"_key": None, "_weight_ref": None, "_value": None}


@torch.no_grad()
def weight_row_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    cache: WeightNormCache | None = None,
    stored: torch.Tensor | None = None,
) -> torch.Tensor:
    """n = ||W + s B A|| over each output row [N], detached, in the accumulation dtype.

    weight [N, K], lora_A [R, K], lora_B [N, R], scaling a float or a 0-dim tensor;
    `cache` keeps ||W_n||^2 between calls, keyed on `stored` when weight is a dense
    copy of a 4-bit weight (`WeightNormCache.squared_row_norms`). No [N, K] temporary
    is formed (but for the bounded blocks that cast a 16-bit W, and the rows recomputed
    for cancellation).
    """
    acc = accumulation_dtype(weight.dtype)
    if isinstance(scaling, torch.Tensor):
        scaling = scaling.detach().to(acc)
    A = lora_A.detach().to(acc)
    B = lora_B.detach().to(acc)
    if cache is None:
        w_sq = squared_row_norms(weight)
    else:
        w_sq = cache.squared_row_norms(weight, stored)
    cross = (B * _weight_times_A(weight, A)).sum(1)  # B_n . (W A^T)_n  [N]
    lora_sq = ((B @ (A @ A.t())) * B).sum(1)  # B_n (A A^T) B_n^T  [N]
    terms = w_sq + scaling * scaling * lora_sq  # T, both parts >= 0
    n_sq = terms + 2 * scaling * cross
    if weight.device.type != "meta":
        cancelled = (n_sq < CANCELLATION_RATIO * terms).nonzero().squeeze(1)
        if cancelled.numel() > 0:
            rows = weight.index_select(0, cancelled).to(acc)
            direct = rows + scaling * (B.index_select(0, cancelled) @ A)
            n_sq = n_sq.index_copy(0, cancelled, torch.linalg.vector_norm(direct, dim=1).square())
    return n_sq.sqrt()


@torch.library.custom_op("lora_kernels::dora_weight_row_norm", mutates_args=())
def _weight_row_norm_op(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor
) -> torch.Tensor:
    return weight_row_norm(weight, lora_A, lora_B, scaling)


@_weight_row_norm_op.register_fake
def _(weight, lora_A, lora_B, scaling):
    return weight.new_empty(weight.shape[0], dtype=accumulation_dtype(weight.dtype))


def weight_row_norm_op(weight, lora_A, lora_B, scaling: torch.Tensor) -> torch.Tensor:
    """`weight_row_norm` without a cache as one opaque op, for torch.compile: the row
    choice for cancellation is data-dependent (a graph break if traced); scaling is a
    0-dim tensor."""
    return _weight_row_norm_op(weight, lora_A.detach(), lora_B.detach(), scaling.detach())
