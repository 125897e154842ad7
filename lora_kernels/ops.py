"""The public functional ops: `lora_linear` and its DoRA variant `dora_linear`.

Checks the arguments, flattens the leading dims of x, draws the dropout seed, picks
the backend (`backends.resolve_backend`) and calls its forward op, whose autograd
formula lives in `contract.py`. The math is in `reference.py`. `dora_linear` calls the
DoRA op of `dora_op.py`, which composes the chosen backend's plain ops, with the norm
of `dora.py` and the plain op's seed. A bitsandbytes 4-bit weight goes to `qlora_op.py`
(LoRA) or `qdora_op.py` (DoRA).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch

from . import backends, contract, dora, dora_op, quant4bit, reference
from .validation import check_backend, check_dropout_p, check_flag

_FLOAT_DTYPES = contract.STORAGE_DTYPES
# The largest seed plus one: seeds are 63-bit so that they fit a signed int64.
SEED_BOUND = 2**63 - 1


def draw_seed(device: torch.device) -> torch.Tensor:
    """A 63-bit seed from torch's default (CPU) generator, as a 0-dim int64 on `device`.

    Drawn from the default generator so that `torch.manual_seed` reproduces runs and
    activation checkpointing, which restores the RNG state, recomputes the same mask.
    """
    return torch.randint(SEED_BOUND, (), dtype=torch.int64).to(device)


def call_seed(p: float, device: torch.device) -> torch.Tensor:
    """The seed of one op call: `draw_seed` with dropout; else a zero, with no draw from
    the generator (eval runs leave RNG alone), as on meta tensors, where no mask is
    ever drawn."""
    if p > 0 and device.type != "meta":
        return draw_seed(device)
    return torch.zeros((), dtype=torch.int64, device=device)


def _shape(t: torch.Tensor) -> str:
    return f"[{', '.join(str(d) for d in t.shape)}]"


def _check_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float16, bfloat16 or "
            f"float64), got {t.dtype}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {_shape(t)}")


def _check_arguments(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> float:
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(
            "x must have at least one dimension (its last is in_features), got a 0-dim tensor"
        )
    _check_tensor("weight", weight, ndim=2)
    _check_tensor("lora_A", lora_A, ndim=2)
    _check_tensor("lora_B", lora_B, ndim=2)
    N, K = weight.shape
    R = lora_A.shape[0]
    if x.shape[-1] != K:
        raise ValueError(
            f"x's last dimension must equal in_features = {K} (weight is {_shape(weight)}), "
            f"got {x.shape[-1]} (x is {_shape(x)})"
        )
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A must have shape [R, {K}], got {_shape(lora_A)}")
    if lora_B.shape != (N, R):
        raise ValueError(
            f"lora_B must have shape [{N}, {R}] (out_features, rank of lora_A), "
            f"got {_shape(lora_B)}"
        )
    if R < 1:
        raise ValueError(f"rank (lora_A.shape[0]) must be at least 1, got {R}")
    if bias is not None:
        _check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != N:
            raise ValueError(f"bias must have shape [{N}], got {_shape(bias)}")
    if isinstance(scaling, torch.Tensor):
        _check_tensor("scaling", scaling)
        if scaling.numel() != 1 or scaling.dim() > 1:
            raise ValueError(f"scaling must be a 0-dim tensor or a float, got {_shape(scaling)}")
    elif isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a float or a 0-dim tensor, got {scaling!r}")
    elif not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling!r}")
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    if isinstance(scaling, torch.Tensor):
        named["scaling"] = scaling
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"weight and bias must have x's dtype {x.dtype} (use torch.autocast for mixed "
            f"precision), got weight {weight.dtype}"
            + (f", bias {bias.dtype}" if bias is not None else "")
        )
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(
            f"lora_A and lora_B must share a dtype, got {lora_A.dtype} and {lora_B.dtype}"
        )
    if lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"lora_A and lora_B must have x's dtype {x.dtype} or float32, got {lora_A.dtype}"
        )
    return check_dropout_p(dropout_p)


# Device types that torch.autocast knows, read once: torch 2.11's dynamo cannot trace
# torch.amp.is_autocast_available, and torch.is_autocast_enabled raises for the others
# (meta, for one).
_AUTOCAST_DEVICE_TYPES = frozenset(
    device_type
    for device_type in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia")
    + (torch._C._get_privateuse1_backend_name(),)
    if torch.amp.is_autocast_available(device_type)
)


def _autocast_disabled(device_type: str):
    """torch.autocast(device_type, enabled=False), or no context for a device type that
    has no autocast (meta), where torch.autocast itself raises."""
    if device_type in _AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_operands(x, *operands):
    """Cast like nn.Linear under torch.autocast: x and every operand (weight, bias,
    lora_A, lora_B, ...) to the autocast dtype; (x, *operands) unchanged otherwise."""
    device_type = x.device.type
    autocast_device = device_type in _AUTOCAST_DEVICE_TYPES
    if not (autocast_device and torch.is_autocast_enabled(device_type)):
        return (x, *operands)
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        is_float = isinstance(t, torch.Tensor) and t.dtype in _FLOAT_DTYPES
        return t.to(dtype) if is_float else t  # anything else is refused by the checks

    return tuple(cast(t) for t in (x, *operands))


def composition_needed() -> str | None:
    """Why this call must run as a composition of ATen ops rather than a fused op, or
    None: a torch.func transform (grad, vjp, jacrev, vmap, jvp, ...) or forward-mode AD
    is active. The fused ops have reverse-mode rules only (their backward is a kernel);
    the composition has every rule torch has, and draws the same Philox mask."""
    if torch.compiler.is_compiling():
        return None  # dynamo traces the op as it is; a transform there is dynamo's
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform"
    if torch.autograd.forward_ad._current_level >= 0:
        return "forward-mode AD (torch.autograd.forward_ad)"
    return None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Y = X W^T + b + s * (dropout(X) A^T) B^T, fused.

    Args:
        x: [*, K] input; leading dims are kept in the output.
        weight: [N, K] frozen base weight, x's dtype; or a bitsandbytes 4-bit
            `Params4bit` (nf4/fp4, with its quant_state) of shape [N, K], dequantized
            into a reused workspace in x's dtype on every call and never saved for
            backward (`lora_kernels.qlora_op`).
        bias: [N] base bias in x's dtype, or None.
        lora_A: [R, K] adapter, x's dtype or float32.
        lora_B: [N, R] adapter, lora_A's dtype.
        scaling: s, a float or a 0-dim tensor (learnable when it requires grad).
        dropout_p: probability of dropping an element of the LoRA branch's input.
        training: dropout applies only when True.
        backend: "triton", "cuda", "cpu", "torch", or None for the automatic choice
            (`lora_kernels.available_backends()` lists what is usable and why). On
            meta tensors no kernel runs: the result has the shapes any backend gives
            (shape inference, deferred init), and no dropout seed is drawn.

    Returns:
        [*, N] in x's dtype. Gradients flow to x, bias, lora_A, lora_B and scaling.
        A weight that requires grad, torch.func transforms (grad, jacrev, vmap, jvp)
        and forward-mode AD are served by a plain composition of ATen ops with the
        same dropout mask (`composition_needed`); under vmap, dropout needs
        `randomness="same"` or `"different"`, as any random op does.
    """
    if quant4bit.is_4bit_weight(weight):
        from .qlora_op import qlora_linear

        return qlora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend)
    # Under autocast, operands of mixed dtypes are legal (nn.Linear accepts them):
    # cast first, then check what the kernels will see.
    if isinstance(x, torch.Tensor) and x.dtype in _FLOAT_DTYPES:
        x, weight, bias, lora_A, lora_B = autocast_operands(x, weight, bias, lora_A, lora_B)
    p = _check_arguments(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    check_flag("training", training)
    check_backend(backend)
    if not training:
        p = 0.0
    K = x.shape[-1]
    N = weight.shape[0]
    # Not reshape(-1, K): with K == 0 the -1 could be any M.
    x2d = x.reshape(math.prod(x.shape[:-1]), K)
    acc = contract.accumulation_dtype(x.dtype)
    on_meta = x.device.type == "meta"
    seed = call_seed(p, x.device)

    if weight.requires_grad or composition_needed():
        # dW is outside the fused kernels (W is frozen by design), and the fused ops have
        # no forward-mode or functorch rules: compose plain ops, with the same mask. A
        # backend asked for by name must still be usable, as for a fused call.
        if backend is not None and not on_meta:
            backends.resolve_backend(x.device.type, backend)
        y = reference.lora_linear_reference(
            x2d, weight, bias, lora_A, lora_B, scaling, p, seed=seed
        )
        return y.reshape(*x.shape[:-1], N)

    if isinstance(scaling, torch.Tensor):
        scaling_t = scaling.reshape(()).to(acc)
    else:
        scaling_t = torch.full((), float(scaling), dtype=acc, device=x.device)
    if on_meta:
        # Shape inference (accelerate's init_empty_weights, FSDP's deferred init): no
        # kernel runs, and every backend's op has the contract's one fake, so the
        # "torch" backend's op, which serves any device, gives the shapes and the
        # autograd graph of whichever backend was asked for.
        forward_op, _ = backends.backend_ops("torch")
    else:
        forward_op, _ = backends.backend_ops(backends.resolve_backend(x.device.type, backend))
    with _autocast_disabled(x.device.type):
        y, _, _ = forward_op(x2d, weight, bias, lora_A, lora_B, scaling_t, p, seed)
    return y.reshape(*x.shape[:-1], N)


def check_dora_arguments(x, N: int, lora_A, magnitude, norm_cache) -> None:
    """DoRA's own arguments, after the plain op's checks: magnitude [N] in lora_A's
    dtype on x's device, and a `dora.WeightNormCache` or None."""
    _check_tensor("magnitude", magnitude, ndim=1)
    if magnitude.shape[0] != N:
        raise ValueError(f"magnitude must have shape [{N}] (out_features), got {_shape(magnitude)}")
    if magnitude.dtype != lora_A.dtype:
        raise TypeError(f"magnitude must have lora_A's dtype {lora_A.dtype}, got {magnitude.dtype}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude must be on x's device {x.device}, got {magnitude.device}")
    if norm_cache is not None and not isinstance(norm_cache, dora.WeightNormCache):
        raise TypeError(
            "norm_cache must be a lora_kernels.dora.WeightNormCache or None, got "
            f"{type(norm_cache).__name__}"
        )


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str | None = None,
    norm_cache: dora.WeightNormCache | None = None,
) -> torch.Tensor:
    """DoRA (peft's `use_dora=True`): Y = (m/n) * (X W^T + s X A^T B^T) + b.

    n = ||W + s B A|| over each output row, detached (`dora.weight_row_norm`). With
    dropout in training, as peft: Y = X W^T + b + (m/n - 1) * D(X) W^T
    + (m/n) * s D(X) A^T B^T, D drawing the plain op's mask for the same seed (one draw
    from torch's default generator per call, as `lora_linear`).

    Args:
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, training: as `lora_linear`;
            a bitsandbytes 4-bit `Params4bit` weight (QDoRA) is dequantized into the
            workspace on every call and never saved (`lora_kernels.qdora_op`).
        magnitude: m [N], lora_A's dtype.
        backend: as `lora_linear`: the chosen backend's fused plain ops run DoRA
            (`lora_kernels.dora_op`); a weight that requires grad, torch.func
            transforms and forward-mode AD run the reference's composition instead.
        norm_cache: a `dora.WeightNormCache` that keeps ||W_n||^2 between calls
            (`LoRALinear` holds one), or None to compute it every call.

    Returns:
        [*, N] in x's dtype. Gradients flow to x, bias, lora_A, lora_B, magnitude and a
        learnable scaling (and to weight, when it requires grad); none through n.
    """
    if quant4bit.is_4bit_weight(weight):
        from .qdora_op import qdora_linear

        return qdora_linear(
            x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, backend,
            norm_cache,
        )  # fmt: skip
    if isinstance(x, torch.Tensor) and x.dtype in _FLOAT_DTYPES:
        x, weight, bias, lora_A, lora_B, magnitude = autocast_operands(
            x, weight, bias, lora_A, lora_B, magnitude
        )
    p = _check_arguments(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    N = weight.shape[0]
    check_dora_arguments(x, N, lora_A, magnitude, norm_cache)
    check_flag("training", training)
    check_backend(backend)
    if not training:
        p = 0.0
    K = x.shape[-1]
    x2d = x.reshape(math.prod(x.shape[:-1]), K)
    acc = contract.accumulation_dtype(x.dtype)
    on_meta = x.device.type == "meta"
    # The plain op's seed: the same draw, so the same mask for the same seed and shape.
    seed = call_seed(p, x.device)
    # The operands are cast already; autocast inside would round the float32 products.
    with _autocast_disabled(x.device.type):
        if weight.requires_grad or composition_needed():
            # As lora_linear: dW and the torch.func / forward-mode rules come from a
            # composition of ATen ops with the same mask.
            if backend is not None and not on_meta:
                backends.resolve_backend(x.device.type, backend)
            weight_norm = dora.weight_row_norm(weight, lora_A, lora_B, scaling, norm_cache)
            y = reference.dora_linear_reference(
                x2d,
                weight,
                bias,
                lora_A,
                lora_B,
                magnitude,
                scaling,
                p,
                seed=seed,
                weight_norm=weight_norm,
            )
            return y.reshape(*x.shape[:-1], N)
        if isinstance(scaling, torch.Tensor):
            scaling_t = scaling.reshape(()).to(acc)
        else:
            scaling_t = torch.full((), float(scaling), dtype=acc, device=x.device)
        # On meta tensors the "torch" backend's ops give the shapes (see lora_linear).
        name = "torch" if on_meta else backends.resolve_backend(x.device.type, backend)
        if torch.compiler.is_compiling():
            # The cache is Python state keyed on the weight's storage; traced, the norm
            # is one op (||W_n||^2 recomputed each call: one pass over W).
            weight_norm = dora.weight_row_norm_op(weight, lora_A, lora_B, scaling_t)
        else:
            weight_norm = dora.weight_row_norm(weight, lora_A, lora_B, scaling_t, norm_cache)
        y, _, _, _ = dora_op.dora_forward(
            x2d, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling_t, p, seed, name
        )
    return y.reshape(*x.shape[:-1], N)
