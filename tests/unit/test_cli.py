"""The CLI: exit codes, no tracebacks for user mistakes, fast start without torch, examples valid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, quiet_env

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_validate_ok_prints_data_summary(cli, write_spec) -> None:
    code, out, _ = cli("validate", str(write_spec()))
    assert code == 0
    assert "messages, 1200 rows" in out and "tokens per row: min" in out and "truncated" in out


def test_validate_broken_spec_exits_2_with_every_problem(cli, write_spec) -> None:
    path = write_spec(train={"learning_rat": 1}, data={"max_length": 4})
    code, out, err = cli("validate", str(path))
    assert code == 2 and out == ""
    assert "train.learning_rat: unknown key 'learning_rat'; did you mean 'learning_rate'?" in err
    assert "data.max_length: Input should be greater than or equal to 16 (got 4)" in err
    assert "Traceback" not in err


def test_validate_bad_data_lists_rows(cli, write_spec, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n{nope\n')
    code, _, err = cli("validate", str(write_spec(data={"train": str(bad)})))
    assert code == 2
    assert f"{bad}:1: conversation has no assistant turn" in err and f"{bad}:2: bad JSON" in err


def test_missing_model_folder_is_exit_2(cli, write_spec) -> None:
    code, _, err = cli("validate", str(write_spec(model={"base": "no/such-model"})))
    assert code == 2 and "model.base no/such-model: no such folder" in err and "hf://no/such-model" in err


def test_plan_shows_mask_stats_steps(cli, write_spec) -> None:
    code, out, _ = cli("plan", str(write_spec(train={"max_steps": -1, "epochs": 2})))
    assert code == 0
    assert "optimizer steps: " in out and "p95" in out and "rough time" in out
    # Without a terminal, trained tokens are marked ⟦...⟧; the user turn is not inside the marks.
    marked = out.split("sample (", 1)[1]
    assert "⟦" in marked and "<|im_end|>⟧" in marked
    assert "<|im_start|>user" not in marked.split("⟦", 1)[1].split("⟧", 1)[0]


@pytest.mark.parametrize("argv", [["validate", "SPEC"], ["plan", "SPEC"], ["schema"], ["--help"], ["train", "--help"]])
def test_fast_verbs_do_not_import_torch_or_transformers_models(write_spec, argv: list[str]) -> None:
    argv = [str(write_spec()) if a == "SPEC" else a for a in argv]
    code = ("import sys\nfrom kubetune.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=quiet_env(),
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("NO-TORCH")


def test_plan_for_kubernetes_prints_the_manifests(cli, write_spec) -> None:
    code, out, _ = cli("plan", str(write_spec()), "--target", "k8s", "--set", "resources.accelerator=nvidia")
    assert code == 0 and "kind: Job" in out and "nvidia.com/gpu: '1'" in out


@pytest.mark.parametrize("argv", [["render", "SPEC"], ["render", "SPEC", "--what", "serve"], ["sweep", "SPEC", "--grid",
                                                                                             "method.lora.r=4,8", "--dry-run"]])
def test_render_and_sweep_planning_do_not_import_torch(write_spec, argv: list[str]) -> None:
    argv = [str(write_spec()) if a == "SPEC" else a for a in argv]
    code = ("import sys\nfrom kubetune.cli import main\nrc = main(sys.argv[1:])\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)")
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=quiet_env(), timeout=60)
    assert res.stdout.strip().endswith("NO-TORCH 0"), res.stdout[-500:] + res.stderr[-2000:]


def test_unexpected_verb_usage_is_exit_2() -> None:
    res = subprocess.run([sys.executable, "-m", "kubetune", "frobnicate"], capture_output=True, text=True,
                         env=quiet_env(), timeout=60)
    assert res.returncode == 2 and "invalid choice" in res.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_validates(example: Path, cli, tiny_model, tmp_path: Path) -> None:
    """Examples name Hub models and buckets; here they are validated with the tiny overrides."""
    from tests.conftest import tiny_overrides

    sets = [] if example.name == "quickstart.yaml" else [a for s in tiny_overrides(tmp_path / "out") for a in ("--set", s)]
    if "qlora" in example.read_text():
        sets += ["--set", "method.type=lora"]  # qlora needs CUDA
    code, out, err = cli("validate", str(example), *sets)
    assert code == 0, err
    assert out.startswith("ok:")


def test_schema_is_json(cli) -> None:
    code, out, _ = cli("schema")
    assert code == 0 and json.loads(out)["title"] == "RunSpec"


def test_plan_show_json_gives_samples_as_trained_and_masked_segments(write_spec, cli) -> None:
    import json

    code, out, err = cli("plan", str(write_spec(name="show", data={"eval": None})), "--show", "3", "--json")
    assert code == 0, err
    samples = [json.loads(line) for line in out.splitlines()]
    assert len(samples) == 3 and all(":" in s["where"] for s in samples)
    for s in samples:
        assert {frozenset(seg) for seg in s["segments"]} == {frozenset({"text", "trained", "ids"})}
        flags = [seg["trained"] for seg in s["segments"]]
        assert flags[0] is False and True in flags  # the prompt is context; the answer is trained
        trained = "".join(seg["text"] for seg in s["segments"] if seg["trained"])
        assert trained.endswith("<|im_end|>")  # up to and including the end-of-turn token, not the newline after it
        context = s["segments"][0]["text"]
        assert context.endswith("<|im_start|>assistant\n")  # the generation prompt is context, never target
