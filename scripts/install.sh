#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install the project into it with pip, from the lock.
#   scripts/install.sh VENV EXTRAS      e.g. scripts/install.sh .venv test
# Every package comes at the version locks/py3.X.txt names (pip constraints; `make lock` refreshes
# them). A CUDA build of torch already visible to python3 is kept (the venv sees the system
# site-packages); otherwise torch==2.13.0, the CPU build, is installed before anything else so
# that no dependency's range can pull a multi-GB CUDA build. The kernel library (kernels/, the
# distribution spell-kernels) is installed before the engine, which depends on it.
set -euo pipefail
cd "$(dirname "$0")/.."
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
version=$("$vpy" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
lock="locks/py$version.txt"
if [ ! -f "$lock" ]; then
  echo "install: no lock for Python $version (locks/ has: $(ls locks | tr '\n' ' '))." >&2
  echo "install: use one of those Pythons (PYTHON=python3.11 make ...), or write a lock for this one with 'make lock'." >&2
  exit 1
fi
pip=("$vpy" -m pip install --quiet --disable-pip-version-check -c "$lock")

if ! "$vpy" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==2.13.0" "triton==3.7.1" numpy
elif ! "$vpy" -c "import triton" 2>/dev/null; then
  "${pip[@]}" "triton==3.7.1" numpy
fi
target="."
[ -n "$extras" ] && target=".[$extras]"
"${pip[@]}" -e ./kernels -e "$target"
"$vpy" -c "import torch, triton, transformers, spell_kernels, spell_core; print('install: torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
