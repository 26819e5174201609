"""corr_warp: the fused correspondence softmax-warp (cosine-similarity attention) of CoCosNet.

`corr_warp(query, key, value, temperature)` computes softmax(q^ k^T / temperature) @ value, where
q^ and k^ are the channel-mean-centred, L2-normalised rows of query and key. The CPU and CUDA
kernels (csrc/corr) are flash-style: they never build the (Nq x Nk) similarity matrix. This
module registers their fake kernels and their autograd formula.
"""
import numbers

import torch

from . import _C  # noqa: F401  (loads the schemas before the registrations below)
from ._corr_checks import LSE_DTYPE, check_backward_inputs, check_inputs

__all__ = ["corr_warp"]


def rounds_normalised_rows(dtype, channels):
    """Whether corr_warp rounds q^ and k^ of float16/bfloat16 inputs to their dtype before the score
    product, as a GPU's unfused implementation does: always, except for bfloat16 rows of fewer than
    16 channels, whose scores both backends compute at fp32 precision (rounds_normalised_rows in
    csrc/corr/corr_math.h is the same rule). The tests' plain baseline follows it."""
    return dtype != torch.bfloat16 or channels >= 16


@torch.library.register_fake("pncc::corr_warp")
def _corr_warp_fake(query, key, value, temperature, normalize, eps):
    check_inputs(query, key, value, temperature, eps)
    B, Nq, _ = query.shape
    out = query.new_empty((B, Nq, value.shape[2]))
    lse = query.new_empty((B, Nq), dtype=LSE_DTYPE)
    return out, lse


@torch.library.register_fake("pncc::_corr_warp_backward")
def _corr_warp_backward_fake(grad_out, query, key, value, out, lse, temperature, normalize, eps):
    check_backward_inputs(grad_out, query, key, value, out, lse, temperature, eps)
    # The kernels return contiguous gradients.
    return (
        query.new_empty(query.shape),
        key.new_empty(key.shape),
        value.new_empty(value.shape),
    )


def _setup_context(ctx, inputs, output):
    query, key, value, temperature, normalize, eps = inputs
    out, lse = output
    # `out` is read by the CUDA flash backward (D = rowsum(dO * out), as FlashAttention-2); the
    # CPU and SIMT backwards sum D from the recomputed P and dP and ignore it.
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.temperature, ctx.normalize, ctx.eps = temperature, normalize, eps
    # lse is an auxiliary output for the backward: autograd must not pretend to differentiate it.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None
    grad_query, grad_key, grad_value = torch.ops.pncc._corr_warp_backward(
        grad_out.contiguous(), query, key, value, out, lse,
        ctx.temperature, ctx.normalize, ctx.eps,
    )
    return grad_query, grad_key, grad_value, None, None, None


torch.library.register_autograd("pncc::corr_warp", _backward, setup_context=_setup_context)


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "pncc.corr_warp does not support double backward (the gradient of its gradient); use "
        "pncc_cuda.reference.corr_warp_reference for higher-order derivatives"
    )


def _setup_backward_context(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "pncc::_corr_warp_backward", _refuse_double_backward, setup_context=_setup_backward_context
)


def _check_real(x, name):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def corr_warp(query, key, value, temperature, normalize=True, eps=1e-6):
    """Correspondence softmax-warp: softmax(q^ k^T / temperature, dim=-1) @ value.

    Args:
        query: (B, Nq, C) float32, float16 or bfloat16 (float64 on CPU).
        key: (B, Nk, C), same dtype and device.
        value: (B, Nk, Cv), same dtype and device; the model appends coordinate channels to get
            the flow in the same call.
        temperature: softmax temperature, a finite number > 0 (CoCosNet uses 0.01).
        normalize: centre each query/key row over C and divide by its L2 norm (+ eps) first.
        eps: added to the row norms, > 0; all-zero rows give finite outputs and gradients.

    Returns:
        out: (B, Nq, Cv), dtype of query. Differentiable with respect to query, key and value
        (once: double backward raises RuntimeError).

    Raises:
        TypeError: a non-tensor argument, a non-floating dtype, mixed dtypes.
        ValueError: wrong ranks or mismatched sizes, mixed devices, temperature or eps out of range.
    """
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    temperature = _check_real(temperature, "temperature")
    eps = _check_real(eps, "eps")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    out, _ = torch.ops.pncc.corr_warp(query, key, value, temperature, normalize, eps)
    return out
