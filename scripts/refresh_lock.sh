#!/usr/bin/env bash
# `make lock`: resolve the newest releases into locks/py3.1X.txt, then smoke-test this Python's
# lock in a fresh venv (imports, a one-step run on the 135M model, the kernel tests on CPU), so a
# refresh is a deliberate change: review `git diff locks/` and commit it with the smoke's result.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$py" -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet --disable-pip-version-check packaging
"$tools/venv/bin/python" scripts/lock.py

smoke="$tools/smoke"
scripts/install.sh "$smoke" test
cd "$tools"  # imports from outside the repository first: the installed layout
"$smoke/bin/python" -c "import spell_kernels, spell_core.run, transformers; from transformers import Qwen2ForCausalLM; print('smoke: imports ok, transformers', transformers.__version__)"
cd - >/dev/null
"$smoke/bin/python" -m spell_core.run --model smollm2-135m-instruct --steps 1 --questions 2 --group-size 2 \
    --max-new-tokens 32 --ctx 256 --out "$tools/run" --no-progress
"$smoke/bin/python" -m pytest -q -n 2 tests/kernels tests/test_packaging.py
echo "smoke: passed. Review 'git diff locks/' and commit it."
