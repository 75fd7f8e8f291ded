# Sourced by the entry scripts: make (or reuse) a virtual environment and install the project into it.
# usage: ensure_venv DIR EXTRAS   (EXTRAS like "" or "[train,dev]")
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

ensure_venv() {
  local dir="$ROOT/$1" extras="$2"
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Python 3.11 or newer is required (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
  if [ ! -x "$dir/bin/python" ]; then
    if ! "$PYTHON" -m venv "$dir" 2>/dev/null; then
      # Debian ships venv separately; as root we can add it, otherwise say how.
      rm -rf "$dir"
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        "$PYTHON" -m venv "$dir"
      else
        echo "error: python3 -m venv failed; install it with: sudo apt-get install python3-venv" >&2
        exit 1
      fi
    fi
  fi
  local stamp="$dir/.installed$extras"
  # Reinstall only when setup.py changed since the last install into this venv.
  if [ ! -f "$stamp" ] || [ "$ROOT/setup.py" -nt "$stamp" ]; then
    # -qq: errors only (a site's pip.conf may add noisy find-links warnings)
    "$dir/bin/python" -m pip install -qq --disable-pip-version-check --upgrade pip
    "$dir/bin/python" -m pip install -qq --disable-pip-version-check -e "$ROOT$extras"
    touch "$stamp"
  fi
}
