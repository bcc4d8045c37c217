#!/usr/bin/env bash
# The quickstart, end to end on CPU: validate → plan → train (+ eval) → merge → eval → base vs tuned answers.
# Run by `make demo` (after `make install assets`). Re-running continues or reuses the finished run.
set -euo pipefail
cd "$(dirname "$0")/.."
KT=".venv/bin/kubetune"
SPEC=examples/quickstart.yaml
export PYTHONWARNINGS="ignore::FutureWarning,ignore::UserWarning"
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1

echo "== kubetune validate $SPEC"
$KT validate "$SPEC"
echo
echo "== kubetune plan $SPEC"
$KT plan "$SPEC"
echo
echo "== kubetune train $SPEC"
$KT train "$SPEC"
echo
echo "== kubetune merge runs/quickstart"
$KT merge runs/quickstart
echo
echo "== kubetune eval runs/quickstart   (the merged model vs its base: loss, ROUGE, exact match)"
$KT eval runs/quickstart
echo
echo "== base vs tuned (kubetune chat runs/quickstart --compare ...)"
$KT chat runs/quickstart --compare "Describe a blue fox." "What is 3 plus 4?" "Spell moon." "Describe a green owl."
