#!/usr/bin/env bash
# Set up the course in ./.venv, then open it in JupyterLab.
#   bash setup.sh              set up (about 2 minutes) and open JupyterLab on notebooks/
#   bash setup.sh --no-launch  set up only (what CI does)
#   bash setup.sh --gpu        also install CuPy for chapter 09, the wheel that matches the NVIDIA driver
# Environment: PYTHON (default python3, needs 3.10+), TORCH_VERSION (default 2.13.0),
# TORCH_INDEX_URL (a PyTorch wheel index to take torch from, e.g. https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "setup.sh: Python 3.10 or newer is needed; set PYTHON=/path/to/python3.x" >&2; exit 1; }

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)

# torch goes first, pinned, so that nothing installed later pulls a CUDA build on a CPU machine.
# PyPI's Linux wheels of torch bring several GB of CUDA libraries; when this machine has no
# NVIDIA GPU and the wheel pip would pick needs them, take the CPU build from PyTorch's index.
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  torch_args=("torch==$TORCH_VERSION")
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    torch_args+=(--index-url "$TORCH_INDEX_URL")
  elif [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    if "${pip[@]}" install --quiet --dry-run --ignore-installed --report - "torch==$TORCH_VERSION" 2>/dev/null \
        | .venv/bin/python -c 'import json, sys; r = json.load(sys.stdin); sys.exit(not any(i["metadata"]["name"].startswith("nvidia") for i in r["install"]))'; then
      echo "setup.sh: no NVIDIA GPU here; taking the CPU build of torch from download.pytorch.org"
      torch_args+=(--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)
    fi
  fi
  "${pip[@]}" install "${torch_args[@]}"
fi

"${pip[@]}" install -e ".[course,dev,serve]"
# nbdev-export loads the course's export processor (pyproject.toml's export_procs) from tools/: put it on the path
.venv/bin/python -c 'import site, sys; open(site.getsitepackages()[0] + "/course_lib_tools.pth", "w").write(sys.argv[1] + "\n")' "$PWD/tools"

# Chapter 09 on a GPU: the CuPy wheel and NVRTC must match a CUDA version the driver supports. The driver
# prints the newest it supports; a CUDA 12 stack runs on 12.x and 13.x drivers, a CUDA 13 stack needs 13.
if [[ " $* " == *" --gpu "* ]]; then
  command -v nvidia-smi >/dev/null 2>&1 || { echo "setup.sh --gpu: nvidia-smi not found: no NVIDIA driver here" >&2; exit 1; }
  cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n 1)
  case "$cuda" in
    12) extra=gpu ;;
    1[3-9]) extra=gpu13 ;;
    *) echo "setup.sh --gpu: the driver supports CUDA '${cuda:-?}'; chapter 09 needs CUDA 12 or 13" >&2; exit 1 ;;
  esac
  echo "setup.sh: driver supports CUDA $cuda: installing .[$extra]"
  "${pip[@]}" install -e ".[course,dev,serve,$extra]"
fi
.venv/bin/python -c 'import torch, course_lib; print(f"course_lib {course_lib.__version__} ready: torch {torch.__version__}, " + ("CUDA " + torch.version.cuda if torch.version.cuda else "CPU build"))'

if [[ " $* " == *" --no-launch "* ]] || [ -n "${CI:-}" ]; then
  exit 0
fi
lab_args=(notebooks/)
[ "$(id -u)" = 0 ] && lab_args+=(--allow-root)  # containers and cloud machines often run as root
exec .venv/bin/jupyter lab "${lab_args[@]}"
