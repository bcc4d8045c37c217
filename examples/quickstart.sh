#!/usr/bin/env bash
# The quickstart, end to end on CPU: validate → plan → train (+ eval) → merge → eval → base vs tuned answers
# → serve (OpenAI-compatible) → one chat request over HTTP → the control plane (kubetune server) driven by the
# openai client: upload, fine-tune, follow, chat.
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
echo "== kubetune eval runs/quickstart   (the tuned model vs its base: loss, ROUGE, exact match)"
$KT eval runs/quickstart
echo
echo "== base vs tuned (kubetune chat runs/quickstart --compare ...)"
$KT chat runs/quickstart --compare "Describe a blue fox." "What is 3 plus 4?" "Spell moon." "Describe a green owl."
echo
echo "== kubetune serve runs/quickstart   (OpenAI-compatible, in the background) + kubetune chat URL"
PORT="${KUBETUNE_DEMO_PORT:-8765}"
$KT serve runs/quickstart --port "$PORT" > runs/quickstart/serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  .venv/bin/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat runs/quickstart/serve.log; exit 1; }
  sleep 0.5
done
head -1 runs/quickstart/serve.log
echo "\$ kubetune chat http://127.0.0.1:$PORT \"Describe a green owl.\""
$KT chat "http://127.0.0.1:$PORT" "Describe a green owl."
echo
echo "== kubetune server   (OpenAI's fine-tuning API + dashboard, in the background) + the openai client"
CPORT="${KUBETUNE_DEMO_CONTROL_PORT:-8766}"
$KT server --home runs/control --port "$CPORT" --runs runs --models-root examples/assets > runs/control.log 2>&1 &
CONTROL=$!
trap 'kill $SERVER $CONTROL 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  .venv/bin/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$CPORT/health', timeout=1)" 2>/dev/null && break
  kill -0 $CONTROL 2>/dev/null || { cat runs/control.log; exit 1; }
  sleep 0.5
done
head -1 runs/control.log
.venv/bin/python examples/control_plane.py "http://127.0.0.1:$CPORT"
echo "dashboard: http://127.0.0.1:$CPORT/ (runs, curves, eval, sweeps, playground)"
