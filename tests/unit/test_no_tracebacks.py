"""Zero tracebacks: every example spec, corrupted at random (wrong types, out-of-range numbers,
unknown and missing keys, whole sections replaced, random --set items), goes through validate,
plan and render --what train|stage|serve and ends with exit 0 or 2 and a message — never a Python
traceback, never the CLI's "unexpected error" (exit 1).

The example specs are first pointed at the project's tiny model and the quickstart eval data (a
local model and data, so validate and plan run here); the corruptions come on top of that.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from kubetune.spec.load import apply_override, parse_override
from tests.conftest import QUICKSTART_DATA, ROOT, TINY

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
LOCAL = [f"model.base={TINY}", f"data.train={QUICKSTART_DATA / 'eval.jsonl'}", "data.eval={split_ratio: 0.2}",
         "data.format=auto", "output=runs/fuzz", "resources.accelerator=cpu", "tracking.report_to=[]"]

values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["", "auto", "-1", "0", "1e309", "cpu", "s3://", "hf://", "a/b/c", "{}", "[]"]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def base_spec(path: Path) -> dict[str, Any]:
    raw = yaml.safe_load(path.read_text())
    for item in LOCAL:
        key, value = parse_override(item)
        apply_override(raw, key, value, item)
    return raw


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, (*prefix, i))
    return out


WORDS = ["auto", "cpu", "nvidia", "amd", "gaudi", "lora", "qlora", "full", "never", "truncate", "drop", "error",
         "all", "assistant", "skip", "messages", "alpaca", "text", "prompt_completion", "chatml", "cosine", "linear",
         "adamw_torch", "adamw_bnb_8bit", "length_buckets", "random", "vllm", "transformers", "float16", "bfloat16",
         "all-linear", "q_proj", "x", "s3://bucket/x", "pvc://claim/x", "gs://bucket/x", "hf://org/name"]


def nudged(current: Any) -> st.SearchStrategy[Any]:
    if isinstance(current, bool):
        return st.booleans()
    if isinstance(current, int):
        return st.integers(-2, 5000)
    if isinstance(current, float):
        return st.floats(-1.0, 3.0)
    if isinstance(current, str):
        return st.sampled_from(WORDS)
    return st.just(current)


@st.composite
def corrupted(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    example = draw(st.sampled_from(EXAMPLES))
    raw = base_spec(example)
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(paths(raw)))
        parent: Any = raw
        for part in where[:-1]:
            parent = parent[part]
        kind = draw(st.sampled_from(["nudge", "nudge", "nudge", "set", "delete", "unknown", "section"]))
        if kind == "nudge":  # a value of the right type, often in range: reaches the checks after the schema
            parent[where[-1]] = draw(nudged(parent[where[-1]]))
        elif kind == "set":
            parent[where[-1]] = draw(values)
        elif kind == "delete" and isinstance(parent, dict):
            parent.pop(where[-1], None)
        elif kind == "unknown" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(values)
        elif kind == "section":
            raw[where[0]] = draw(values)
        if not isinstance(raw, dict):
            break
    sets = []
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.sampled_from(paths(base_spec(example))))
        node: Any = base_spec(example)
        for part in where:
            node = node[part]
        key = draw(st.sampled_from([".".join(str(p) for p in where)] * 4 + [draw(st.text(max_size=10))]))
        value = draw(st.one_of(nudged(node), nudged(node), values))
        sets.append(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return copy.deepcopy(raw), sets


VERBS = [["validate"], ["plan"], ["render", "--what", "train"], ["render", "--what", "stage"],
         ["render", "--what", "serve"]]


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v))
@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=corrupted())
def test_no_spec_the_schema_admits_or_breaks_ends_in_a_traceback(verb: list[str], case: tuple[dict[str, Any], list[str]],
                                                                  cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, sets = case
    monkeypatch.chdir(ROOT)  # example stage scripts are named relative to the project
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("KUBETUNE_DEBUG", raising=False)
    spec = tmp_path / "fuzzed.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    argv = [verb[0], str(spec), *verb[1:], *[a for s in sets for a in ("--set", s)]]
    code, out, err = cli(*argv)
    assert code in (0, 2), f"kubetune {' '.join(argv)} → exit {code}\n{spec.read_text()}\n{err[-3000:]}"
    assert "Traceback" not in out + err
    if code == 2:
        assert err.startswith("error: "), err[-2000:]
