"""pytest plugin: run the test suite's CPU cases on the emulated CUDA kernels.

    python -m pytest -p tools.cuda_emu.pytest_plugin tests/test_corr.py -k accuracy

(from the repository root). The pncc ops on CPU tensors then run csrc/**/*_cuda.cu under
tools/cuda_emu/emu_runtime.h instead of the CPU kernels, so every CPU test that uses only what
the CUDA kernels support (no float64 corr_warp, no CPU-only thread-count tests) checks the CUDA
code against the same references.
"""
import pathlib
import sys
import warnings

REPO = pathlib.Path(__file__).resolve().parents[2]


def pytest_configure(config):
    sys.path[:0] = [str(REPO), str(REPO / "python")]
    import pncc_cuda  # noqa: F401  (the schemas and the CPU kernels first)

    from tools.cuda_emu.build import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load()
    config.addinivalue_line("markers", "cuda_emu: running on the emulated CUDA kernels")


def pytest_report_header(config):
    return "pncc ops on CPU tensors run the CUDA kernels under tools/cuda_emu (emulated)"
