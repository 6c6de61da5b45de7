#!/usr/bin/env bash
# Install medsr-dist and its pinned dependencies into one Python: the ONE install recipe, used by `make install`
# (and so `make demo`, `make test`, CI) and by cluster/Dockerfile (the KubeRay image), so the image cannot drift
# from what CI tests.
#
#   cluster/install.sh --venv .venv --python python3.11 --extras test   # what the Makefile runs
#   cluster/install.sh --python /home/ray/anaconda3/bin/python --extras cluster   # what the Dockerfile runs
#
# --python PY    the interpreter to install into; with --venv, the one that creates the venv (default python3)
# --venv DIR     create DIR as a venv with PY if it has no bin/python yet, then install into DIR/bin/python
# --extras LIST  comma-separated extras of the package (test, cluster); "test" also installs realesrgan, the
#                test-only reference implementation
# --src DIR      the medsr-dist source tree (default: this script's parent folder); installed editable
# --log FILE     pip's output goes to FILE (appended) and the terminal gets one line per step; a failing step
#                shows the log's last lines. Without it (the image build, CI) pip writes to the terminal as usual.
set -euo pipefail

PY=python3
VENV=""
EXTRAS=""
LOG=""
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) PY="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --extras) EXTRAS="$2"; shift 2 ;;
    --src) SRC="$2"; shift 2 ;;
    --log) LOG="$2"; shift 2 ;;
    *) echo "install.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[[ -f "$SRC/pyproject.toml" ]] || { echo "install.sh: no pyproject.toml in $SRC" >&2; exit 2; }

if [[ -n "$VENV" ]]; then
  test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
  PY="$VENV/bin/python"
fi
PIP=("$PY" -m pip install -q --disable-pip-version-check)
if [[ -n "$LOG" ]]; then
  mkdir -p "$(dirname "$LOG")"
  : > "$LOG"
fi

# step "what" command...: one line on the terminal; with --log the command's output goes to the log, and a failure
# shows its tail
step() {
  local what="$1"; shift
  if [[ -z "$LOG" ]]; then
    echo "install: $what"
    "$@"
    return
  fi
  printf 'install: %s ... ' "$what"
  echo "=== $what: $*" >> "$LOG"
  if "$@" >> "$LOG" 2>&1; then
    echo ok
  else
    local rc=$?
    echo "FAILED (exit $rc)"
    echo "--- last 40 lines of $LOG ---" >&2
    tail -n 40 "$LOG" >&2
    exit "$rc"
  fi
}

step "pip, setuptools, wheel" "${PIP[@]}" --upgrade pip setuptools wheel
# The CUDA build of torch that also runs on CPU; pip takes it from the local wheel cache where pip is set up so.
step "torch 2.14.1, torchvision 0.29.1" "${PIP[@]}" torch==2.14.1 torchvision==0.29.1
if [[ -n "$EXTRAS" ]]; then
  step "medsr-dist (editable, extras $EXTRAS) and its dependencies" "${PIP[@]}" -e "$SRC[$EXTRAS]"
else
  step "medsr-dist (editable) and its dependencies" "${PIP[@]}" -e "$SRC"
fi
# basicsr 1.4.2: its setup.py imports torch (so no build isolation) and its pins pull
# opencv-python beside opencv-python-headless and tb-nightly (so no deps; pyproject lists what it needs).
# Installed after medsr-dist: a later resolver run would check its unmet pins and print
# "ERROR: pip's dependency resolver ..." about packages that are left out on purpose.
step "basicsr 1.4.2 (no deps)" "${PIP[@]}" --no-build-isolation --no-deps basicsr==1.4.2
if [[ ",$EXTRAS," == *",test,"* ]]; then
  # Test-only reference implementation (RealESRGANer) for parity tests and benchmarks; its own pins
  # pull opencv-python, facexlib and gfpgan, none of which RealESRGANer needs.
  step "realesrgan 0.3.0 (no deps, tests' reference)" "${PIP[@]}" --no-deps realesrgan==0.3.0
fi
if [[ -n "$LOG" ]]; then
  echo "install: done (pip's output: $LOG)"
fi
