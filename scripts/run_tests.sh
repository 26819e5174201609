#!/usr/bin/env bash
# The README's test command: sets up a fresh machine (scripts/setup.sh), then runs the suite.
# CUDA tests are marked and skip cleanly without a GPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest tests "$@"
