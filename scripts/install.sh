#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install the project into it with pip.
#   scripts/install.sh VENV EXTRAS      e.g. scripts/install.sh .venv test
# A CUDA build of torch already visible to python3 is kept (the venv sees the system
# site-packages); otherwise torch==2.13.0, the CPU build, is installed before anything
# else so that no dependency's range can pull a multi-GB CUDA build.
set -euo pipefail
venv=${1:-.venv}
extras=${2:-}
py=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  if "$py" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "install: keeping the CUDA torch of $py"
    "$py" -m venv --system-site-packages "$venv"
  else
    "$py" -m venv "$venv"
  fi
fi
vpy="$venv/bin/python"
pip=("$vpy" -m pip install --quiet --disable-pip-version-check)

if ! "$vpy" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==2.13.0" "triton==3.7.1" numpy
elif ! "$vpy" -c "import triton" 2>/dev/null; then
  "${pip[@]}" "triton==3.7.1" numpy
fi
target="."
[ -n "$extras" ] && target=".[$extras]"
"${pip[@]}" -e "$target"
"$vpy" -c "import torch, triton, spell_kernels, spell_core; print('install: torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available())"
