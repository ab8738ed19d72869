#!/usr/bin/env bash
# Sets up whatever is missing in .venv/ (see tools/env.sh), then runs the main job.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" tools/run_main.py "$@"
