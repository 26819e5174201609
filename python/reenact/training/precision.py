"""Precision, memory layout and compilation of a training run: ``--precision bf16``'s autocast
dtype and ``--compile``'s availability checks, each refused with a TrainingError naming the flag."""
import contextlib
import importlib
import sys

import torch
import torch.nn.functional as F

from .errors import TrainingError


def cpu_bf16_autocast_works():
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            probe = F.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1))
    except RuntimeError:
        return False
    return probe.dtype == torch.bfloat16


def autocast_dtype(precision, device):
    """The autocast dtype of ``--precision`` on ``device`` (None: fp32, no autocast)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):  # native bf16 from Ampere on
            raise TrainingError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support "
                                f"(compute capability 8.0 or newer is needed); use --precision fp32")
    elif device.type == "cpu":
        if not cpu_bf16_autocast_works():
            raise TrainingError("--precision bf16: this torch build cannot autocast to bfloat16 on the CPU; "
                                "use --precision fp32")
    else:
        raise TrainingError(f"--precision bf16 runs on CUDA or the CPU, not on {device}")
    return torch.bfloat16


def check_compile_available(device):
    """Raise TrainingError when ``torch.compile`` (TorchInductor) cannot run on ``device``."""
    try:
        dynamo = importlib.import_module("torch._dynamo")
        cpp_builder = importlib.import_module("torch._inductor.cpp_builder")
    except ImportError as err:
        raise TrainingError(f"--compile: this torch has no TorchInductor ({err}); leave --compile out") from None
    if not dynamo.is_dynamo_supported():
        raise TrainingError(f"--compile: torch.compile does not support Python {sys.version.split()[0]} with "
                            f"torch {torch.__version__}; leave --compile out")
    if device.type == "cpu":
        try:
            cpp_builder.get_cpp_compiler()
        except (RuntimeError, OSError, ImportError) as err:
            raise TrainingError(f"--compile on the CPU needs a C++ compiler for TorchInductor ({err}); "
                                f"install one (g++) or leave --compile out") from None


@contextlib.contextmanager
def compile_errors(enabled):
    """Turn a TorchInductor/Dynamo failure of the first compiled call into a TrainingError."""
    if not enabled:
        yield
        return
    from torch._dynamo.exc import BackendCompilerFailed  # start-up time: dynamo loads only with --compile

    try:
        yield
    except BackendCompilerFailed as err:
        cause = getattr(err, "inner_exception", None) or err
        reason = (str(cause).strip().splitlines() or [""])[0]
        raise TrainingError(f"--compile: torch.compile failed ({type(cause).__name__}: {reason}); "
                            f"leave --compile out") from None
