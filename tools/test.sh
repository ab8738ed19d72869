#!/usr/bin/env bash
# Sets up whatever is missing in .venv/ (see tools/env.sh), then runs the test suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh tests/ops -k roi`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q -ra "$@"
