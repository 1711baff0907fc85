#!/usr/bin/env bash
# The project's test command: install, lint, run the whole test suite (the real SmolLM2 tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
ruff check .
python -m pytest -q "$@"
