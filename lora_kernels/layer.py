"""`LoRALinear`: a drop-in wrapper of a frozen `nn.Linear` with a trainable LoRA adapter.

The module owns the parameters and their life cycle (initialisation, merge, unmerge);
the math runs in the functional op `lora_kernels.lora_linear`, which this module only
calls. Shapes: K = in_features, N = out_features, R = rank.

    Y = X W^T + b + s * (dropout(X) A^T) B^T,   A = lora_A [R, K], B = lora_B [N, R]

With `use_dora=True` (DoRA, peft's `use_dora`), a magnitude m = lora_magnitude [N] and
n = ||W + s B A|| per output row (detached) rescale the rows: without dropout
Y = (m/n) * (X W^T + s X A^T B^T) + b (see `lora_kernels.dora_linear` for dropout).

Adapter dtype: float32 when the wrapped layer is float16 or bfloat16 (as peft does by
default, `autocast_adapter_dtype=True`: half-precision adapters lose small updates),
otherwise the layer's dtype. `layer.to(torch.bfloat16)` casts the adapter too, for
those who want half-precision adapters. The adapter lives on the wrapped layer's device.

A bitsandbytes `Linear4bit` (QLoRA: nf4 or fp4, any blocksize, double quantization on
or off, any quant_storage) is wrapped as it is stored, no dense copy kept: forward
runs `lora_linear` on its `Params4bit` weight in the layer's compute dtype
(`compute_dtype`, else x's dtype, as `Linear4bit.forward`), adapters in float32 (peft's
default). Merging follows peft's `lora.bnb.Linear4bit`: dequantize, add s B A,
quantize again with the same settings (lossy: one more 4-bit rounding of W);
`merge_weights()` gives a dense `nn.Linear` instead. DoRA over a 4-bit base (QDoRA)
runs `dora_linear` on the same weight, n taken of W in `quant_state.dtype`, and merges
as peft's 4-bit DoRA layer: (m/n) (W + s B A) in W's dtype, quantized again.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from . import dora, quant4bit
from .contract import accumulation_dtype
from .ops import dora_linear, lora_linear
from .validation import (
    check_alpha,
    check_backend,
    check_dropout_p,
    check_flag,
    check_init,
    check_rank,
)


def adapter_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype LoRALinear gives lora_A, lora_B (and a learnable scaling)."""
    if weight_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight_dtype


def _check_dora_merge_scale(scale: torch.Tensor | None) -> None:
    """Refuse a DoRA merge whose m/n unmerge could not divide out."""
    if scale is not None and not scale.ne(0).all():
        rows = scale.eq(0).nonzero().flatten().tolist()
        raise ValueError(
            f"LoRALinear.merge(): DoRA's scale m/n is 0 on row(s) {rows[:8]} (a zero "
            "magnitude), which unmerge could not divide out; the weight was left "
            "unchanged (merge_weights() builds the merged layer without that need)"
        )


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update, computed by `lora_linear`.

    Args:
        original_linear_layer: the `nn.Linear` (weight [N, K], bias [N] or None) to
            wrap, or a bitsandbytes `Linear4bit`; it is kept as `original_linear` with
            requires_grad=False.
        rank: R >= 1.
        alpha: finite > 0; scaling = alpha / R (alpha / sqrt(R) with `use_rslora`).
        dropout: probability p in [0, 1) of dropping an element of the LoRA branch's
            input while training.
        init: "kaiming" (A kaiming-uniform with a=sqrt(5), B zeros), "gaussian"
            (A ~ N(0, std=1/R) as peft, B zeros) or "svd" (PiSSA, see
            `reset_lora_parameters`).
        use_rslora: scale by alpha / sqrt(R) (rank-stabilised LoRA).
        learnable_scaling: make `scaling` a 0-dim `nn.Parameter` (adapter dtype) that
            trains with A and B.
        backend: backend name passed to `lora_linear`, or None for the automatic choice.
        use_dora: DoRA (Liu et al. 2024, peft's `use_dora=True`): adds the parameter
            `lora_magnitude` [N] (adapter dtype), initialised to the row norms of
            W + s B A, and runs `dora_linear` on the same backends as `lora_linear`
            (over a 4-bit base too). `merge` folds the row scale in:
            W' = (m/n) (W + s B A).

    Input x [*, K] in the wrapped layer's dtype; output [*, N] in x's dtype. Gradients
    of A, B (and a learnable scaling) come in their own dtype. Under `torch.autocast`
    every operand is cast to the autocast dtype, as for `nn.Linear`.
    """

    def __init__(
        self,
        original_linear_layer: nn.Linear,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        learnable_scaling: bool = False,
        backend: str | None = None,
        use_dora: bool = False,
    ):
        super().__init__()
        if not isinstance(original_linear_layer, nn.Linear):
            raise TypeError(
                "original_linear_layer must be a torch.nn.Linear, got "
                f"{type(original_linear_layer).__name__}"
            )
        self.rank = check_rank(rank)
        self.alpha = check_alpha(alpha)
        self.dropout = check_dropout_p(dropout, "dropout")
        self.init = check_init(init)
        self.use_rslora = check_flag("use_rslora", use_rslora)
        learnable_scaling = check_flag("learnable_scaling", learnable_scaling)
        self.backend = check_backend(backend)
        self.use_dora = check_flag("use_dora", use_dora)

        self.quantized = quant4bit.is_4bit_weight(original_linear_layer.weight)
        if self.quantized and self.init == "svd":
            raise NotImplementedError(
                "LoRALinear: init='svd' on a 4-bit Linear4bit base is not supported (it "
                "writes a residual into the dense weight); use init='kaiming' or 'gaussian'"
            )
        if self.quantized and getattr(original_linear_layer.weight, "quant_state", None) is None:
            raise ValueError(
                "original_linear_layer is a Linear4bit whose weight is not quantized yet "
                "(weight.quant_state is None): move it to its device first (.to('cpu') or "
                ".cuda() quantizes it)"
            )
        self.in_features = original_linear_layer.in_features
        self.out_features = original_linear_layer.out_features
        if init == "svd" and self.rank > min(self.in_features, self.out_features):
            raise ValueError(
                f"init='svd' needs rank <= min(in_features, out_features) = "
                f"{min(self.in_features, self.out_features)}, got rank={self.rank}"
            )
        # Frozen only once every argument passed: a refused call leaves the layer as it was.
        self.original_linear = original_linear_layer
        for p in self.original_linear.parameters():
            p.requires_grad_(False)
        weight = self.original_linear.weight

        # A 4-bit layer's adapter is float32, as peft makes it.
        adapter_dtype = torch.float32 if self.quantized else adapter_dtype_for(weight.dtype)
        factory = {"device": weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.zeros(self.rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, **factory))
        s = self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)
        if learnable_scaling:
            self.scaling = nn.Parameter(torch.tensor(s, **factory))
        else:
            self.scaling = s
        # What init="svd" took out of the wrapped weight, s0 * B0 A0 = U_r S_r V_r^T as
        # two thin factors (float32 or wider), so that reset and unwrap can put it back.
        self.register_buffer("_svd_US", None, persistent=False)  # [N, R]
        self.register_buffer("_svd_Vh", None, persistent=False)  # [R, K]
        # DoRA's m/n [N] (accumulation dtype) that `merge` folded into the weight, which
        # `unmerge` divides out again (as peft keeps the norm it merged with).
        self.register_buffer("_dora_merge_scale", None, persistent=False)
        if self.use_dora:
            self.lora_magnitude = nn.Parameter(torch.zeros(self.out_features, **factory))
        else:
            self.register_parameter("lora_magnitude", None)
        # ||W_n||^2 of the frozen weight, for DoRA's norm; see dora.WeightNormCache.
        self._weight_norm_cache = dora.WeightNormCache()
        self._enabled = True
        self._merged = False
        self.reset_lora_parameters()

    @property
    def learnable_scaling(self) -> bool:
        return isinstance(self.scaling, nn.Parameter)

    @property
    def merged(self) -> bool:
        """True while the update s * B A is folded into `original_linear.weight`."""
        return self._merged

    @property
    def enabled(self) -> bool:
        """False makes forward return exactly the wrapped layer's output."""
        return self._enabled

    @enabled.setter
    def enabled(self, flag: bool) -> None:
        check_flag("enabled", flag)
        # A merged layer carries the update in its weight: disabling must take it out.
        if not flag and self._merged:
            self.unmerge()
        self._enabled = flag

    def _scaling_value(self) -> float:
        if isinstance(self.scaling, torch.Tensor):
            return self.scaling.detach().item()
        return self.scaling

    @torch.no_grad()
    def _restore_svd_residual(self) -> None:
        """Put back into the wrapped weight what init="svd" took out of it."""
        if self._svd_US is None:
            return
        weight = self.original_linear.weight
        acc = accumulation_dtype(weight.dtype)
        restored = weight.to(acc) + self._svd_US.to(acc) @ self._svd_Vh.to(acc)
        weight.copy_(restored)
        self._weight_changed()
        self._svd_US = None
        self._svd_Vh = None

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Re-initialise lora_A and lora_B with `self.init`; the scaling is left as is.

        Any earlier SVD residual is undone first, so after a reset the layer's output is
        the original base layer's output (exactly for "kaiming" and "gaussian", where
        B = 0; up to rounding for "svd"). With DoRA, lora_magnitude becomes the row norms
        of W + s B A (those of the original weight: B = 0, or W the SVD residual).

        "svd" (PiSSA, Meng et al. 2024, as peft's init_lora_weights="pissa"): with
        W = U S V^T and the top-R triplets U_r [N, R], S_r [R], V_r^T [R, K],
        A = sqrt(S_r) V_r^T / sqrt(s), B = U_r sqrt(S_r) / sqrt(s), and the frozen
        weight becomes the residual W - s B A. Both factors train from step one while
        the output is unchanged. The SVD runs in float32 (float64 for a float64 layer);
        the residual is formed in float64 from the stored (rounded) A and B, so it
        matches them up to one rounding to W's dtype.
        """
        if self._merged:
            raise RuntimeError("reset_lora_parameters on a merged LoRALinear: unmerge() first")
        self._restore_svd_residual()
        if self.init == "kaiming":
            # Kaiming-uniform with a=sqrt(5), nn.Linear's own init: bound = 1/sqrt(K).
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        elif self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.rank)
            nn.init.zeros_(self.lora_B)
        else:
            self._init_svd()
        if self.use_dora:
            self.lora_magnitude.copy_(self._weight_row_norm())

    @torch.no_grad()
    def _weight_row_norm(self) -> torch.Tensor:
        """DoRA's n = ||W + s B A|| [N] (accumulation dtype), from the current adapter;
        a 4-bit W dequantized to `quant_state.dtype`, as forward takes it."""
        weight = self.original_linear.weight
        if self.quantized:
            weight = self._plain_4bit_weight()
            dense = quant4bit.dequantize_4bit(weight)
            return dora.weight_row_norm(
                dense, self.lora_A, self.lora_B, self.scaling, self._weight_norm_cache, weight
            )
        return dora.weight_row_norm(
            weight, self.lora_A, self.lora_B, self.scaling, self._weight_norm_cache
        )

    def _init_svd(self) -> None:
        s = self._scaling_value()
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"init='svd' needs a finite scaling > 0, got {s!r}")
        weight = self.original_linear.weight
        acc = accumulation_dtype(weight.dtype)
        U, S, Vh = torch.linalg.svd(weight.to(acc), full_matrices=False)
        R = self.rank
        root = S[:R].sqrt()
        self.lora_A.copy_((root[:, None] * Vh[:R]) / math.sqrt(s))
        self.lora_B.copy_((U[:, :R] * root[None, :]) / math.sqrt(s))
        # s B A from the stored (rounded) factors: what forward adds back to the residual.
        self._svd_US = s * self.lora_B.to(acc)
        self._svd_Vh = self.lora_A.to(acc).clone()
        weight.copy_(weight.to(acc) - self._svd_US @ self._svd_Vh)
        self._weight_changed()

    def _weight_changed(self) -> None:
        """Drop the cached ||W_n||^2 after this layer wrote `original_linear.weight` (the
        cache's version-counter key would notice too; this does not rely on it)."""
        self._weight_norm_cache.clear()

    def _load_from_state_dict(self, *args, **kwargs):
        # A loaded state dict may carry a new base weight.
        self._weight_changed()
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [*, K] -> [*, N] in x's dtype; the base layer alone when disabled or merged."""
        if not self._enabled or self._merged:
            return self.original_linear(x)
        if self.quantized:
            return self._forward_4bit(x)
        if self.use_dora:
            return dora_linear(
                x,
                self.original_linear.weight,
                self.original_linear.bias,
                self.lora_A,
                self.lora_B,
                self.lora_magnitude,
                self.scaling,
                dropout_p=self.dropout,
                training=self.training,
                backend=self.backend,
                norm_cache=self._weight_norm_cache,
            )
        return lora_linear(
            x,
            self.original_linear.weight,
            self.original_linear.bias,
            self.lora_A,
            self.lora_B,
            self.scaling,
            dropout_p=self.dropout,
            training=self.training,
            backend=self.backend,
        )

    def _forward_4bit(self, x: torch.Tensor) -> torch.Tensor:
        from .qlora_op import linear4bit_forward

        return linear4bit_forward(
            self.original_linear,
            x,
            self.lora_A,
            self.lora_B,
            self.scaling,
            self.dropout,
            self.training,
            self.backend,
            magnitude=self.lora_magnitude,
            norm_cache=self._weight_norm_cache if self.use_dora else None,
        )

    def _plain_4bit_weight(self):
        from .qlora_op import plain_4bit_weight

        return plain_4bit_weight(self.original_linear)

    @torch.no_grad()
    def _merged_4bit(self, sign: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the dense weight to quantize, DoRA's m/n or None), as peft's 4-bit merge
        (sign +1) and unmerge (-1) form it from the dequantized W: W + sign * s B A in
        the promoted dtype of W and the adapter; with DoRA (m/n) (W + s B A), and
        W' / (m/n) - s B A with the m/n of the merge, in W's dtype (peft's DoRA
        variant). Refuses a non-finite result."""
        dense = quant4bit.dequantize_4bit(self._plain_4bit_weight())
        acc = torch.promote_types(dense.dtype, self.lora_A.dtype)
        scale = None
        if not self.use_dora:
            merged = dense.to(acc) + sign * self._delta(acc)
        elif sign > 0:
            scale = self.lora_magnitude.detach().to(acc) / self._weight_row_norm().to(acc)
            merged = (scale[:, None] * (dense.to(acc) + self._delta(acc))).to(dense.dtype)
        else:
            restored = dense.to(acc) / self._dora_merge_scale.to(acc)[:, None]
            merged = (restored - self._delta(acc)).to(dense.dtype)
        if not torch.isfinite(merged).all():
            bad = int((~torch.isfinite(merged)).sum())
            raise ValueError(
                f"merging the LoRA update into the 4-bit weight of shape [{self.out_features}, "
                f"{self.in_features}] gives {bad} non-finite value(s) (a NaN/inf adapter); "
                "the weight was left unchanged"
            )
        return merged, scale

    @torch.no_grad()
    def _requantize(self, dense: torch.Tensor) -> None:
        """Replace the 4-bit weight by `dense` quantized with its settings (peft's way:
        a new Params4bit from the old one's attributes, quantized on its device)."""
        import bitsandbytes as bnb

        weight = self.original_linear.weight
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_")}
        kwargs.pop("data", None)
        kwargs["bnb_quantized"] = False
        kwargs["requires_grad"] = False
        new = bnb.nn.Params4bit(dense.to("cpu"), **kwargs).to(weight.device)
        self.original_linear.weight = new
        self._weight_changed()

    @torch.no_grad()
    def _delta(self, dtype: torch.dtype) -> torch.Tensor:
        """s * B A [N, K] in `dtype`, from the current adapter."""
        s = self.scaling.detach().to(dtype) if self.learnable_scaling else self.scaling
        return s * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    @torch.no_grad()
    def _merged_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged weight in W's dtype, rounded once, and DoRA's row scale.

        W + s B A, or with DoRA (m/n) (W + s B A) with n = ||W + s B A|| per row, as
        peft's merge; the scale m/n [N] (accumulation dtype) comes second, None without
        DoRA. Refuses (like peft's safe_merge) when the result is not finite.
        """
        weight = self.original_linear.weight
        acc = accumulation_dtype(weight.dtype)
        merged = weight.to(acc) + self._delta(acc)
        scale = None
        if self.use_dora:
            scale = self.lora_magnitude.detach().to(acc) / self._weight_row_norm()
            merged = scale[:, None] * merged
        merged = merged.to(weight.dtype)
        if not torch.isfinite(merged).all():
            bad = int((~torch.isfinite(merged)).sum())
            raise ValueError(
                f"merging the LoRA update into a {weight.dtype} weight of shape "
                f"[{self.out_features}, {self.in_features}] gives {bad} non-finite "
                "value(s) (a NaN/inf adapter or an overflow); the weight was left unchanged"
            )
        return merged, scale

    @torch.no_grad()
    def merge_weights(self) -> nn.Linear:
        """A new `nn.Linear` with weight W + s B A [N, K] (DoRA: (m/n) (W + s B A)) and
        a copy of the bias.

        Its output matches this layer's eval-mode output. The layer itself is not
        changed. The new parameters have the wrapped layer's requires_grad (frozen).
        For a 4-bit layer: the dequantized W plus s B A, in `quant_state.dtype`.
        """
        weight = self.original_linear.weight
        bias = self.original_linear.bias
        if self.quantized:
            # The dense layer of a 4-bit one: W in quant_state.dtype, the original dtype.
            dtype = weight.quant_state.dtype
            if self._merged:
                merged_weight = quant4bit.dequantize_4bit(self._plain_4bit_weight())
            else:
                merged_weight = self._merged_4bit(+1)[0]
        else:
            dtype = weight.dtype
            merged_weight = weight if self._merged else self._merged_weight()[0]
        merged = nn.Linear(
            self.in_features,
            self.out_features,
            bias=bias is not None,
            device=weight.device,
            dtype=dtype,
        )
        merged.weight.copy_(merged_weight)
        merged.weight.requires_grad_(weight.requires_grad)
        if bias is not None:
            merged.bias.copy_(bias)
            merged.bias.requires_grad_(bias.requires_grad)
        return merged

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s B A into `original_linear.weight` in place; forward then skips the branch.

        With DoRA the weight becomes W' = (m/n) (W + s B A), n = ||W + s B A|| per row
        (peft's DoRA merge); the scale m/n is kept for `unmerge`. Merging a merged layer
        warns and does nothing. A merge whose result is not finite raises ValueError
        and leaves the weight untouched. While merged, A, B (and m) get no gradient;
        call `unmerge()` before training further. A 4-bit layer gets, as with peft, a
        new `Params4bit` of W + s B A quantized with the old one's settings (it warns:
        the output changes by that rounding), and `unmerge()` quantizes W - s B A again.
        """
        if self._merged:
            warnings.warn("LoRALinear.merge(): already merged, nothing done", stacklevel=2)
            return
        if not self._enabled:
            raise RuntimeError(
                "LoRALinear.merge(): the adapter is disabled (enabled=False); enable it "
                "before merging"
            )
        if self.quantized:
            warnings.warn(
                "LoRALinear.merge(): merging into a 4-bit weight quantizes W + s B A again "
                "(as peft does); outputs change by that rounding",
                stacklevel=2,
            )
            merged, scale = self._merged_4bit(+1)
            _check_dora_merge_scale(scale)
            self._requantize(merged)
        else:
            merged, scale = self._merged_weight()
            _check_dora_merge_scale(scale)
            self.original_linear.weight.copy_(merged)
            self._weight_changed()
        self._dora_merge_scale = scale
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take s B A back out of `original_linear.weight` (DoRA: W = W' / (m/n) - s B A,
        with the m/n that `merge` used, as peft's unmerge).

        Restores the weight within rounding, not bit for bit: the merge and the unmerge
        each round to W's dtype, so an element is off by about one rounding step of W's
        dtype (DoRA: a few units in the last place of max(|W|, |W + s B A|), since the
        merged row is scaled and divided back). Unmerging an unmerged layer warns and
        does nothing.
        """
        if not self._merged:
            warnings.warn("LoRALinear.unmerge(): not merged, nothing done", stacklevel=2)
            return
        if self.quantized:
            # As peft: dequantize, subtract, quantize again (not the original codes).
            self._requantize(self._merged_4bit(-1)[0])
            self._dora_merge_scale = None
            self._merged = False
            return
        weight = self.original_linear.weight
        acc = accumulation_dtype(weight.dtype)
        restored = weight.to(acc)
        if self._dora_merge_scale is not None:
            restored = restored / self._dora_merge_scale.to(acc)[:, None]
        weight.copy_(restored - self._delta(acc))
        self._weight_changed()
        self._dora_merge_scale = None
        self._merged = False

    @torch.no_grad()
    def unwrap(self) -> nn.Linear:
        """The wrapped `nn.Linear` holding its original weight, the adapter dropped.

        Unmerges if merged and puts back what init="svd" took out of the weight. The
        returned layer stays frozen. Discard this LoRALinear afterwards.
        """
        if self._merged:
            self.unmerge()
        self._restore_svd_residual()
        return self.original_linear

    def extra_repr(self) -> str:
        text = "4-bit, " if self.quantized else ""
        text += (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout:g}, "
            f"backend={self.backend!r}"
        )
        if self.init != "kaiming":
            text += f", init={self.init!r}"
        if self.use_rslora:
            text += ", use_rslora=True"
        if self.learnable_scaling:
            text += ", learnable_scaling=True"
        if self.use_dora:
            text += ", use_dora=True"
        if self._merged:
            text += ", merged=True"
        if not self._enabled:
            text += ", enabled=False"
        return text
