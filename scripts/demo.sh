#!/usr/bin/env bash
# The appliance demo in its own virtual environment (.venv, the site install: no TensorFlow).
source "$(dirname "$0")/venv.sh"
ensure_venv .venv "[demo]"
cd "$ROOT"
exec .venv/bin/edge-agent demo-run "$@"
