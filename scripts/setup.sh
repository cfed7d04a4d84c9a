#!/usr/bin/env bash
# Create (or reuse) .venv/ in the repository root and install effigen into it.
#   bash scripts/setup.sh          # library + CLI
#   bash scripts/setup.sh --serve  # + the `serve` extra (Gradio) for `effigen serve`, the web page
#   bash scripts/setup.sh --test   # + test extras (pytest, the `serve` extra: Gradio, Playwright), and Debian's
#                                  # chromium for the browser tests of `effigen serve` when it is missing and apt-get
#                                  # can be used as root (otherwise those tests skip and say why)
# torch is installed first and pinned to 2.13.0 (the CPU build on these machines) unless the
# venv already has a torch: installing effigen never replaces an installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
[ "${1:-}" = "--serve" ] && extras="[serve]"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
# torch's version is read from the package metadata: importing torch before numpy is installed prints a
# "Failed to initialize NumPy" warning.
installed_torch() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('torch').split('+')[0])" 2>/dev/null; }
if ! installed_torch >/dev/null; then
  $PIP install -q "torch==2.13.0"
fi
torch_version=$(installed_torch)
# The constraint keeps pip from "upgrading" the torch that is there while resolving effigen's deps.
constraint=$(mktemp)
echo "torch==${torch_version}" > "$constraint"
$PIP install -q -c "$constraint" -e ".${extras}"
rm -f "$constraint"
.venv/bin/python -c "import effigen, torch; print(f'effigen {effigen.__version__} ready (torch {torch.__version__}) in .venv/')"
if [ "${1:-}" = "--test" ] && [ ! -x /usr/bin/chromium ] && [ -z "${EFFIGEN_CHROMIUM:-}" ]; then
  # Playwright's own browser download is not used: the tests drive the system's Chromium.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser tests of effigen serve (apt-get)"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >/dev/null 2>&1 \
      || echo "could not install chromium with apt-get: the browser tests of effigen serve will be skipped"
  else
    echo "no /usr/bin/chromium and no apt-get as root: the browser tests of effigen serve will be skipped" \
         "(install chromium, or set EFFIGEN_CHROMIUM=/path/to/chromium)"
  fi
fi
