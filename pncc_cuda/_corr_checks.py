"""Input preconditions of corr_warp and _corr_warp_backward, for the fake (meta) kernels.

They state the checks of csrc/corr/corr_check.cpp with word-for-word the same messages (spelled by
:mod:`._messages`, as csrc/common/checks.h spells them), so that a traced program fails the way an
eager one does.
"""
import math

import torch

from ._messages import check_same_device, shape_str

#: dtype of the saved log-sum-exp for every input dtype (kLseDtype in csrc/corr/corr_check.h).
LSE_DTYPE = torch.float64
_FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_rank3(t, name, dims):
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape {dims}, got {shape_str(t)}")


def _check_dtype(t, name, query):
    if t.dtype not in _FLOATING:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float16 or bfloat16; float64 on "
            f"CPU), got {t.dtype}"
        )
    if t.dtype != query.dtype:
        raise TypeError(
            f"{name} must have the dtype of query ({query.dtype}), got {t.dtype}"
        )
    if t.dtype == torch.float64 and t.device.type == "cuda":
        raise TypeError(f"{name} must not be float64 on CUDA (float64 is supported on CPU only)")


def _check_device(t, name, query):
    check_same_device(name, t, query, "query")


def check_inputs(query, key, value, temperature, eps):
    """The preconditions of csrc/corr/corr_check.cpp, with the same messages (for fake kernels)."""
    _check_rank3(query, "query", "(B, Nq, C)")
    _check_rank3(key, "key", "(B, Nk, C)")
    _check_rank3(value, "value", "(B, Nk, Cv)")
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_dtype(t, name, query)
    _check_device(key, "key", query)
    _check_device(value, "value", query)
    B, _, C = query.shape
    Nk = key.shape[1]
    if C < 1:
        raise ValueError(
            f"query must have at least one channel (C >= 1), got shape {shape_str(query)}"
        )
    if key.shape[0] != B or key.shape[2] != C:
        raise ValueError(
            f"key must have shape (B, Nk, C) = ({B}, Nk, {C}) to match query, got "
            f"{shape_str(key)}"
        )
    if value.shape[0] != B or value.shape[1] != Nk:
        raise ValueError(
            f"value must have shape (B, Nk, Cv) = ({B}, {Nk}, Cv) to match query and key, got "
            f"{shape_str(value)}"
        )
    # `:g` prints a double the way C++ streams do, so both messages read the same.
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature:g}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps:g}")


def check_backward_inputs(grad_out, query, key, value, out, lse, temperature, eps):
    check_inputs(query, key, value, temperature, eps)
    B, Nq, Cv = query.shape[0], query.shape[1], value.shape[2]
    for t, name in ((grad_out, "grad_out"), (out, "out")):
        if t.dim() != 3 or tuple(t.shape) != (B, Nq, Cv):
            raise ValueError(
                f"{name} must have shape (B, Nq, Cv) = ({B}, {Nq}, {Cv}), got {shape_str(t)}"
            )
        _check_dtype(t, name, query)
        _check_device(t, name, query)
    if lse.dim() != 2 or tuple(lse.shape) != (B, Nq):
        raise ValueError(f"lse must have shape (B, Nq) = ({B}, {Nq}), got {shape_str(lse)}")
    if lse.dtype != LSE_DTYPE:
        raise TypeError(f"lse must have dtype {LSE_DTYPE}, got {lse.dtype}")
    _check_device(lse, "lse", query)
