"""Reports which backends the built extension registered; with --require-cuda, fails unless the
CUDA kernels were compiled in (a silent CPU-only build must not pass CI)."""
import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

import torch  # noqa: E402

OPS = ["rasterize", "_rasterize_backward", "interpolate", "_interpolate_backward", "render_pncc",
       "corr_warp", "_corr_warp_backward"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--require-cuda", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    try:
        import pncc_cuda  # noqa: F401
    except ImportError as error:
        print(f"pncc_cuda is not built: {error}", file=sys.stderr)
        return 1
    missing = []
    for op in OPS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pncc::{op}", "CPU"):
            missing.append(f"{op} (CPU)")
        if args.require_cuda and not torch._C._dispatch_has_kernel_for_dispatch_key(f"pncc::{op}", "CUDA"):
            missing.append(f"{op} (CUDA)")
    has_cuda = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"pncc::{op}", "CUDA") for op in OPS)
    if not args.quiet:
        print(f"pncc_cuda built: CPU kernels yes, CUDA kernels {'yes' if has_cuda else 'no'}; "
              f"GPU visible: {torch.cuda.is_available()}")
    if missing:
        if not args.quiet:
            print("missing kernels: " + ", ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
