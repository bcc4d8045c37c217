"""The house rule of docs/design.md, "Layers": nothing outside the `runs` package spells where a file
of a run lives — every path and key comes from runs.layout (RUN_KEYS, RunLayout). Messages to a user
may name them (they are inside longer text); a literal that *is* a run key, or an f-string piece that
joins one onto a path, is flagged."""

from __future__ import annotations

import ast
from pathlib import Path

from kubetune.runs.layout import COMPLETE, RUN_KEYS

SRC = Path(__file__).resolve().parents[2] / "src" / "kubetune"
KEYS = {RUN_KEYS.spec, RUN_KEYS.manifest, RUN_KEYS.events, RUN_KEYS.trackers, RUN_KEYS.lease, RUN_KEYS.adapter,
        RUN_KEYS.merged, RUN_KEYS.final_complete, RUN_KEYS.eval_metrics, RUN_KEYS.eval_samples,
        RUN_KEYS.eval_report, COMPLETE, "metrics.json", "samples.jsonl", "report.md", "checkpoint-"}
# "spec.yaml" here is not a run's: the key of the spec ConfigMap a Job mounts, and a control-plane job's folder
NOT_A_RUN = {("k8s/render/train.py", "spec.yaml"), ("k8s/client.py", "spec.yaml"), ("control/worker.py", "spec.yaml")}


def _spelled(tree: ast.AST) -> list[tuple[int, str]]:
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            joined = " " not in text and any(part in text for part in ("checkpoints/", "final/", "eval/", "/final"))
            if text in KEYS or text.strip("/") in KEYS or joined:  # a key, or a piece that joins a path onto one
                found.append((node.lineno, text))
    return found


def test_run_paths_are_spelled_only_in_the_runs_package() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("runs/"):
            continue
        for line, text in _spelled(ast.parse(path.read_text())):
            if (rel, text.strip("/")) not in NOT_A_RUN:
                offenders.append(f"src/kubetune/{rel}:{line}: {text!r}")
    assert offenders == [], "use runs.layout (RUN_KEYS / RunLayout):\n" + "\n".join(offenders)
