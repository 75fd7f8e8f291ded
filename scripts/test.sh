#!/usr/bin/env bash
# The whole test suite in its own virtual environment (.venv-test, with the train and dev extras).
source "$(dirname "$0")/venv.sh"
ensure_venv .venv-test "[train,dev]"
cd "$ROOT"
exec .venv-test/bin/python -m pytest "$@"
