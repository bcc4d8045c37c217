"""The `vllm serve` command line for a run (vLLM itself needs a CUDA GPU, so the command is what is tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune.errors import UsageError
from kubetune.serve.server import choose_engine, vllm_target
from kubetune.serve.vllm import max_lora_rank, vllm_command


def _adapter_run(tmp_path: Path, r: int = 12, merged: bool = False) -> Path:
    run = tmp_path / "runs" / "r1"
    (run / "final" / "adapter").mkdir(parents=True)
    (run / "spec.yaml").write_text(yaml.safe_dump({"name": "r1", "model": {"base": "hf://org/Base-7B@main"},
                                                  "data": {"train": "d.jsonl"}}))
    (run / "final" / "adapter" / "adapter_config.json").write_text(json.dumps({"r": r, "rank_pattern": {}}))
    (run / "final" / "adapter" / "tokenizer_config.json").write_text("{}")
    if merged:
        (run / "final" / "merged").mkdir()
        (run / "final" / "merged" / "config.json").write_text("{}")
        (run / "final" / "merged" / "tokenizer_config.json").write_text("{}")
    return run


def test_adapter_run_is_served_as_a_lora_module_with_the_runs_template(tmp_path: Path) -> None:
    run = _adapter_run(tmp_path)
    cmd = vllm_command(vllm_target([str(run)]), port=9000, max_num_seqs=32)
    adapter = str(run / "final" / "adapter")
    assert cmd[:3] == ["vllm", "serve", "org/Base-7B"] and cmd[cmd.index("--revision") + 1] == "main"
    assert cmd[cmd.index("--lora-modules") + 1] == f"r1={adapter}"
    assert "--enable-lora" in cmd and cmd[cmd.index("--max-lora-rank") + 1] == "16"  # 12 → vLLM's next size
    assert cmd[cmd.index("--served-model-name") + 1] == "Base-7B"
    assert cmd[cmd.index("--chat-template") + 1] == f"{adapter}/chat_template.jinja"
    assert cmd[cmd.index("--generation-config") + 1] == adapter  # stops at the run's end-of-turn token
    assert cmd[cmd.index("--max-num-seqs") + 1] == "32" and cmd[cmd.index("--port") + 1] == "9000"


def test_a_merged_lora_run_serves_its_adapter_as_on_kubernetes_and_its_merge_by_name(tmp_path: Path) -> None:
    from kubetune.k8s.render.serve import served_run
    from kubetune.spec.load import load_spec

    run = _adapter_run(tmp_path, merged=True)
    cmd = vllm_command(vllm_target([str(run)]))
    served = served_run(load_spec(run / "spec.yaml"), str(run))
    # one rule (runs.layout.serves_merged): here and in the rendered Deployment, the adapter on its base
    assert cmd[cmd.index("--lora-modules") + 1] == f"r1={served.uri}" and served.base == "hf://org/Base-7B@main"
    merged = vllm_command(vllm_target([str(run / "final" / "merged")]))  # the merge, named as a model folder
    assert merged[2] == str(run / "final" / "merged") and "--enable-lora" not in merged
    assert merged[merged.index("--served-model-name") + 1] == "r1"  # the run's name, not "merged"


def test_a_full_run_is_served_whole_under_the_run_name_here_and_on_kubernetes(tmp_path: Path) -> None:
    from kubetune.k8s.render.serve import served_run
    from kubetune.spec.load import load_spec

    run = _adapter_run(tmp_path, merged=True)
    spec = yaml.safe_load((run / "spec.yaml").read_text())
    (run / "spec.yaml").write_text(yaml.safe_dump({**spec, "method": {"type": "full"}}))
    cmd = vllm_command(vllm_target([str(run)]))
    served = served_run(load_spec(run / "spec.yaml"), str(run))
    assert cmd[2] == served.uri == str(run / "final" / "merged") and served.base is None
    assert "--enable-lora" not in cmd and cmd[cmd.index("--served-model-name") + 1] == "r1"


def test_lora_ranks_round_up_to_what_vllm_accepts() -> None:
    assert [max_lora_rank(r) for r in (1, 4, 8, 9, 64, 65, 500)] == [1, 8, 8, 16, 64, 128, 512]
    with pytest.raises(UsageError, match="method.lora.r"):
        max_lora_rank(1024)


def test_engine_vllm_without_vllm_is_a_clear_error() -> None:
    with pytest.raises(UsageError, match="vLLM is not installed|no CUDA GPU"):
        choose_engine("vllm")
    assert choose_engine("auto") == "transformers"  # this machine: no vLLM, no GPU


def test_torchrun_command_for_one_node_and_for_several() -> None:
    from kubetune.launch.torchrun import torchrun_command

    one = torchrun_command("/etc/kubetune/spec.yaml", [], 2)
    assert "--standalone" in one and "--nproc_per_node=2" in one
    many = torchrun_command("/etc/kubetune/spec.yaml", ["train.seed=1"], 8, nodes=2, run_id="r",
                            rdzv_endpoint="r-0.r.ml.svc:29500")
    assert "--standalone" not in many
    assert many[many.index("--nnodes") + 1] == "2" and many[many.index("--rdzv-backend") + 1] == "c10d"
    assert many[many.index("--rdzv-endpoint") + 1] == "r-0.r.ml.svc:29500" and many[-2:] == ["--set", "train.seed=1"]


def test_several_nodes_without_a_cluster_is_a_clear_error(cli, write_spec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBETUNE_RDZV_ENDPOINT", raising=False)
    code, _, err = cli("train", str(write_spec(resources={"accelerator": "cpu", "nodes": 2})))
    assert code == 2 and "resources.nodes > 1 needs a cluster" in err


def test_the_runs_template_picks_the_tool_call_and_reasoning_parsers(tmp_path: Path) -> None:
    """vLLM reads tool calls and <think> reasoning back in the format the saved template trained."""
    run = _adapter_run(tmp_path)
    adapter = run / "final" / "adapter"
    assert "--tool-call-parser" not in vllm_command(vllm_target([str(run)]))  # a template without tool calls
    (adapter / "chat_template.jinja").write_text("{{ '<|im_start|>' }}<think></think>{{ '<tool_call>' }}")
    cmd = vllm_command(vllm_target([str(run)]))
    assert "--enable-auto-tool-choice" in cmd and cmd[cmd.index("--tool-call-parser") + 1] == "hermes"
    assert cmd[cmd.index("--reasoning-parser") + 1] == "qwen3"
    (adapter / "chat_template.jinja").write_text("{{ '[TOOL_CALLS]' }}")
    cmd = vllm_command(vllm_target([str(run)]))
    assert cmd[cmd.index("--tool-call-parser") + 1] == "mistral" and "--reasoning-parser" not in cmd
    spec = yaml.safe_load((run / "spec.yaml").read_text())
    (run / "spec.yaml").write_text(yaml.safe_dump({**spec, "serve": {"tool_parser": "none"}}))
    assert "--tool-call-parser" not in vllm_command(vllm_target([str(run)]))  # serve.tool_parser: none
