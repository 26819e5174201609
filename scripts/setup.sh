#!/usr/bin/env bash
# Installs everything the project needs on a fresh machine and builds the extension in place.
# Idempotent: a second run installs nothing and rebuilds only when sources changed.
#
#   FORCE_CUDA=1|0, TORCH_CUDA_ARCH_LIST   passed through to setup.py (see its docstring)
#   PYTHON                                 interpreter to install into (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.14.1   # a CUDA 13.0 build; kernels compile for it even without a GPU

pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PYTHON" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "== installing torch==$TORCH_VERSION"
  pip_install "torch==$TORCH_VERSION"
fi
echo "== installing build, runtime and test dependencies"
pip_install -r requirements/build.txt -r requirements/runtime.txt -r requirements/test.txt

# Rebuild when no extension exists or a source is newer than it.
so=$(ls pncc_cuda/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" -type f 2>/dev/null | head -n 1)" ] \
   || { [ "${FORCE_CUDA:-}" = 1 ] && ! "$PYTHON" scripts/check_build.py --quiet --require-cuda; }; then
  echo "== building pncc_cuda._C (editable install)"
  "$PYTHON" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e . \
    || { echo "build failed: see the compiler output above" >&2; exit 1; }
fi
require=()
if [ "${FORCE_CUDA:-}" = 1 ]; then require=(--require-cuda); fi
"$PYTHON" scripts/check_build.py "${require[@]}"
