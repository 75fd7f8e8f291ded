# Sourced by the entry scripts: make (or reuse) a virtual environment and install the project into it.
# usage: ensure_venv DIR EXTRAS   (EXTRAS like "" or "[train,dev]")
# Progress goes to stderr, one whole line per step (CI logs show lines, not partial ones), so a
# first run that installs for minutes never looks hung and stdout stays the command's own.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

_setup_say() {
  echo "set-up: $*" >&2
}

# What a first install downloads, in words a newcomer recognises; keep in step with setup.py.
_setup_describe() {
  local extras="$1" what="the site packages (LiteRT, OpenCV, paho-mqtt, Flask, prometheus-client)" more=()
  case "$extras" in *train*) more+=("TensorFlow for training") ;; esac
  case "$extras" in *dev*) more+=("the test tools (pytest, hypothesis, amqtt)") ;; esac
  case "$extras" in *demo*) more+=("an embedded MQTT broker (amqtt)") ;; esac
  local i
  for i in "${!more[@]}"; do
    if [ "$i" = $((${#more[@]} - 1)) ]; then what="$what and ${more[$i]}"; else what="$what, ${more[$i]}"; fi
  done
  case "$extras" in
    *train*) echo "$what; about 2-3 minutes the first time" ;;
    *) echo "$what; about 1 minute the first time" ;;
  esac
}

# Run pip with its output in LOG; on failure show the tail of it and stop.
_setup_pip() {
  local python="$1" log="$2"
  shift 2
  if ! "$python" -m pip install --disable-pip-version-check --progress-bar off "$@" >>"$log" 2>&1; then
    _setup_say "pip failed; the last lines of its log ($log):"
    tail -n 25 "$log" >&2
    exit 1
  fi
}

ensure_venv() {
  local dir="$ROOT/$1" extras="$2" started
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Python 3.11 or newer is required (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
  if [ ! -x "$dir/bin/python" ]; then
    started=$SECONDS
    _setup_say "creating the virtual environment $1 ..."
    if ! "$PYTHON" -m venv "$dir" 2>/dev/null; then
      # Debian ships venv separately; as root we can add it, otherwise say how.
      rm -rf "$dir"
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        _setup_say "installing Debian's python3-venv with apt-get ..."
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        "$PYTHON" -m venv "$dir"
      else
        echo "error: python3 -m venv failed; install it with: sudo apt-get install python3-venv" >&2
        exit 1
      fi
    fi
    _setup_say "created $1 in $((SECONDS - started)) s"
  fi
  local stamp="$dir/.installed$extras" log="$dir/pip-install.log"
  # Reinstall only when setup.py changed since the last install into this venv.
  if [ ! -f "$stamp" ] || [ "$ROOT/setup.py" -nt "$stamp" ]; then
    started=$SECONDS
    _setup_say "installing into $1: $(_setup_describe "$extras") ..."
    # pip's own output (progress, a site's pip.conf warnings) goes to the log, shown on failure.
    : >"$log"
    _setup_pip "$dir/bin/python" "$log" --upgrade pip
    _setup_pip "$dir/bin/python" "$log" -e "$ROOT$extras"
    touch "$stamp"
    _setup_say "installed into $1 in $((SECONDS - started)) s (pip's log: $log)"
  else
    _setup_say "$1 already installed, up to date"
  fi
}
