"""The operator's policy as a hostile tenant meets it: every path-, URI-, host-, module-, credential-,
cluster- and resource-naming field of the `kubetune` extension refused with its param; every number
capped; operator values winning; a minimal job environment; paths redacted; bounded bodies and uploads."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.control.environment import job_environment
from kubetune.control.files import save_upload
from kubetune.control.jobs import JobPolicy, JobRequest, Start, build_spec
from kubetune.control.policy import Limits, Refused, ServerConfig, check_tenant_settings, load_config
from kubetune.control.redact import redact
from kubetune.errors import SpecError, UsageError
from kubetune.serve.body_limit import json_depth

JOB = "ftjob-0123456789abcdef01234567"

# One request per field a tenant must not set, each as an attacker would try it.
ATTACKS: dict[str, Any] = {
    "data.train": "../../files", "data.eval": "/etc/passwd", "data.eval.path": "s3://other/rows.jsonl",
    "model.base": "/srv/models/secret", "model.adapter": "../runs/ftjob-other", "model.trust_remote_code": True,
    "model.revision": "main", "model.chat_template": "/etc/shadow",
    "resume": "../runs/ftjob-other/checkpoints/checkpoint-10", "output": "/tmp/x", "name": "x",
    "tracking.mlflow_uri": "sqlite:////srv/control.db", "tracking.report_to": ["mlflow"],
    "storage.endpoint_url": "http://127.0.0.1:9", "storage.profile": "admin",
    "stage.model": "hf://evil/model", "stage.data": [{"script": "evil.py"}],
    "kubernetes.namespace": "kube-system", "kubernetes.image": "evil/image", "kubernetes.service_account": "admin",
    "kubernetes.secrets.hf_token": "other-team/token", "kubernetes.secrets.storage": "prod-creds",
    "kubernetes.priority_class": "system-cluster-critical", "kubernetes.tolerations": [{"operator": "Exists"}],
    "kubernetes.queue": None, "kubernetes.node_selector": {"x": "y"}, "kubernetes.storage_class": "fast",
    "kubernetes.run_as_user": 1, "kubernetes.labels": {"a": "b"},
    "resources.accelerator": "nvidia", "resources.cpu": "512", "resources.memory": "2Ti", "resources.nodes": 64,
    "resources.devices_per_node": 8, "serve.image": "evil", "train.dataloader_workers": 64,
    "train.compile": True,
}


def build(kubetune: dict[str, Any] | None = None, policy: JobPolicy | None = None, rows: int = 100,
          **request: Any) -> Any:
    req = JobRequest(model="tiny", training_file="file-1", kubetune=kubetune, **request)
    return build_spec(JOB, req, Start("/srv/models/tiny"), "/srv/files/file-1/train.jsonl", None,
                      f"/srv/runs/{JOB}", policy, rows)


@pytest.mark.parametrize("field", sorted(ATTACKS))
def test_every_field_that_names_something_outside_the_job_is_refused(field: str) -> None:
    with pytest.raises(Refused) as refused:
        build({field: ATTACKS[field]})
    assert refused.value.param.startswith(f"kubetune.{field.split('.')[0]}")
    assert "operator" in refused.value.message or "server" in refused.value.message


def test_nested_and_dotted_forms_are_the_same_field() -> None:
    with pytest.raises(Refused, match="kubetune.kubernetes.namespace"):
        build({"kubernetes": {"namespace": "kube-system"}})
    with pytest.raises(Refused, match="kubetune.data.eval"):
        build({"data": {"eval": "/etc/passwd"}})
    assert build({"method": {"lora": {"r": 8}}, "train.max_steps": 5}).method.lora.r == 8


def test_training_knobs_are_allowed() -> None:
    spec = build({"train": {"learning_rate": 1e-3, "max_steps": 30, "lr_scheduler": "linear"},
                  "method": {"lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj"]}},
                  "data": {"max_length": 512, "eval": {"split_ratio": 0.1}, "system_prompt": "Be brief."},
                  "eval": {"metrics": ["rouge"]}, "model.chat_template": "chatml"})
    assert (spec.train.max_steps, spec.method.lora.r, spec.data.max_length) == (30, 8, 512)
    assert spec.data.eval_ratio() == 0.1 and spec.model.chat_template == "chatml"
    assert spec.model.base == "/srv/models/tiny" and spec.output == f"/srv/runs/{JOB}"


@pytest.mark.parametrize("kubetune,request_,param", [
    ({"train.max_steps": 10**9}, {}, "kubetune.train.max_steps"),
    ({}, {"hyperparameters": {"n_epochs": 1e9}}, "hyperparameters.n_epochs"),
    ({}, {"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 10**6}}}},
     "method.supervised.hyperparameters.batch_size"),
    ({}, {"hyperparameters": {"learning_rate_multiplier": 1e12}}, "hyperparameters.learning_rate_multiplier"),
    ({"data.max_length": 10**7}, {}, "kubetune.data.max_length"),
    ({"method.lora.r": 1024}, {}, "kubetune.method.lora.r"),
    ({"train.max_per_device_batch_size": 4096}, {}, "kubetune.train.max_per_device_batch_size"),
    ({"train.keep_checkpoints": 10**6}, {}, "kubetune.train.keep_checkpoints"),
    ({"eval.num_samples": 10**8, "eval.metrics": ["rouge"], "data.eval.split_ratio": 0.1}, {},
     "kubetune.eval.num_samples"),
    ({"eval.max_new_tokens": 10**8}, {}, "kubetune.eval.max_new_tokens"),
    ({"data.system_prompt": "x" * 100_000}, {}, "kubetune.data.system_prompt"),
    ({"method.lora.target_modules": ["q"] * 1000}, {}, "kubetune.method.lora.target_modules"),
    ({"train.max_steps": 10**400}, {}, "kubetune.train.max_steps"),
    ({"train.seed": 2**63}, {}, "kubetune.train.seed"),
    ({"train.learning_rate": float("inf")}, {}, "kubetune.train.learning_rate"),
    ({}, {"hyperparameters": {"n_epochs": 10**400}}, "hyperparameters.n_epochs"),
    ({}, {"hyperparameters": {"learning_rate_multiplier": 10**400}}, "hyperparameters.learning_rate_multiplier"),
    ({}, {"hyperparameters": {"batch_size": -3}}, "hyperparameters.batch_size"),
    ({f"train.max_stepz{i}": 1 for i in range(20_000)}, {}, "kubetune"),
    ({"train.max_steps": 20_000, "train.save_every_steps": 1}, {}, "kubetune.train.save_every_steps"),
    ({"train.max_steps": 20_000, "train.eval_every_steps": 1, "data.eval.split_ratio": 0.5}, {},
     "kubetune.train.eval_every_steps"),
])
def test_every_number_a_tenant_sets_is_capped(kubetune: dict[str, Any], request_: dict[str, Any],
                                              param: str) -> None:
    with pytest.raises(Refused) as refused:
        build(kubetune, **request_)
    assert refused.value.param == param


def test_steps_derived_from_epochs_and_tokens_per_job_are_capped() -> None:
    policy = JobPolicy(limits=Limits(max_steps=100, max_tokens_per_job=10_000_000))
    with pytest.raises(Refused, match="over this server's limit of 100 steps") as refused:
        build(policy=policy, rows=100_000, hyperparameters={"n_epochs": 1})
    assert refused.value.param == "hyperparameters.n_epochs"
    with pytest.raises(Refused, match="tokens per job"):
        build({"train.max_steps": 90, "data.max_length": 8192}, policy=policy)
    # the eval rows at each evaluation count too: 50 steps x 16 rows alone fit, not with 51 evaluations of 5,000 rows
    build({"train.max_steps": 50, "data.max_length": 1024}, policy=policy, rows=100_000)
    with pytest.raises(Refused, match=r"\+ 51 x 5,000 eval rows"):
        build({"train.max_steps": 50, "data.max_length": 1024, "train.eval_every_steps": 1,
               "data.eval.split_ratio": 0.05}, policy=policy, rows=100_000)
    with pytest.raises(Refused, match="full is not offered"):
        build({"method.type": "full", "train.max_steps": 5}, policy=JobPolicy(limits=Limits(methods=["lora"])))
    with pytest.raises(Refused, match="dpo is not offered"):
        build({"train.max_steps": 5}, policy=JobPolicy(limits=Limits(objectives=["sft"])),
              method={"type": "dpo"})


def test_the_operator_wins_and_the_server_fields_cannot_be_moved() -> None:
    operator = ({"kubernetes": {"namespace": "ml"}}, {"kubernetes": {"namespace": "team-a", "queue": "team-a-q"},
                                                      "tracking": {"report_to": ["mlflow"], "mlflow_uri": "http://m"},
                                                      "train": {"save_every_steps": 50}})
    spec = build({"train": {"save_every_steps": 5, "max_steps": 10}}, policy=JobPolicy(operator))
    assert (spec.kubernetes.namespace, spec.kubernetes.queue) == ("team-a", "team-a-q")
    assert spec.train.save_every_steps == 50 and spec.tracking.mlflow_uri == "http://m"


def test_grpo_rewards_are_builtins_or_registered_names() -> None:
    base = {"method": {"objective": "grpo", "grpo": {"num_generations": 2}}, "train.total_batch_size": 4,
            "train.max_steps": 5}
    with pytest.raises(Refused, match="reward code is the operator's") as refused:
        build({**base, "method.grpo.rewards": [{"function": "os:system"}]})
    assert refused.value.param == "kubetune.method.grpo.rewards.0.function"
    with pytest.raises(Refused, match="not a reward setting"):
        build({**base, "method.grpo.rewards": [{"function": "length", "max_chars": 9, "module": "os"}]})
    spec = build({**base, "method.grpo.rewards": [{"function": "format_ok", "weight": 0.5},
                                                  {"function": "length", "max_chars": 40}]},
                 policy=JobPolicy(rewards={"format_ok": "tests.rewards:format_ok"}))
    assert [r.function for r in spec.method.grpo.rewards] == ["tests.rewards:format_ok", "length"]


def test_a_misspelt_knob_still_gets_the_specs_did_you_mean() -> None:
    with pytest.raises(SpecError) as bad:
        build({"method": {"lora": {"rank": 8}}})
    assert [p.where for p in bad.value.problems] == ["kubetune.method.lora.rank"]
    assert check_tenant_settings({"train.max_steps": 3}, {}) == ({"train.max_steps": 3}, [])
    for sneaky in ({"method.grpo.rewards.0.function": "os:system"}, {"kubernetes.secrets.0": "x"},
                   {"data.columns": {"messages": "m"}, "data.train.0": "/etc/passwd"}):
        with pytest.raises((SpecError, Refused)) as refused:
            build(sneaky)
        assert "kubetune." in (refused.value.render() if isinstance(refused.value, SpecError) else str(refused.value))


def test_the_configuration_file_is_checked_at_start(tmp_path: Path) -> None:
    good = tmp_path / "server.yaml"
    good.write_text("models: {root: /models, allow: [{name: 'Qwen/*'}]}\nlimits: {max_steps: 100}\n"
                    "rewards: {format_ok: 'tests.rewards:format_ok'}\nenv: [MY_TOKEN]\n"
                    "teams: {a: {keys: [team-a], spec: {kubernetes: {namespace: a}}, budgets: {max_running_jobs: 1}}}\n")
    config = load_config(good)
    assert config.limits.max_steps == 100 and config.team_of("key-1", "team-a") is config.teams["a"]
    assert config.budgets_for(config.team_of("key-1", "team-a")).max_running_jobs == 1
    assert config.budgets_for(config.team_of("key-2", "other")).max_running_jobs == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits: {max_stepz: 1}\nrewards: {x: 'not a path'}\n")
    with pytest.raises(SpecError) as problems:
        load_config(bad)
    assert "limits.max_stepz" in str(problems.value.problems[0])
    from kubetune.control.server import check_policy

    with pytest.raises(UsageError, match="set by the server"):
        check_policy(ServerConfig(spec={"data": {"train": ["/x"]}}), {}, "server.yaml")
    with pytest.raises(SpecError):
        check_policy(ServerConfig(spec={"kubernetes": {"namespace": "Not A Name", "bogus": 1}}), {}, "server.yaml")


def test_a_job_process_gets_only_what_its_job_needs() -> None:
    server_env = {"PATH": "/usr/bin", "HOME": "/home/srv", "PGPASSWORD": "canary-pg", "KUBETUNE_API_KEY": "kt-x",
                  "OPENAI_API_KEY": "sk-canary", "DATABASE_URL": "postgresql://u:p@h/db",
                  "AWS_SECRET_ACCESS_KEY": "canary-aws", "AWS_ACCESS_KEY_ID": "AK", "HF_TOKEN": "hf-canary",
                  "MLFLOW_TRACKING_TOKEN": "canary-mlflow", "WANDB_API_KEY": "canary-wandb",
                  "KUBETUNE_CACHE": "/cache", "OPERATOR_EXTRA": "yes", "LC_ALL": "C.UTF-8"}
    local = build({"train.max_steps": 5})
    env = job_environment(local, server_env)
    assert set(env) == {"PATH", "HOME", "KUBETUNE_CACHE", "LC_ALL"}
    in_s3 = build({"train.max_steps": 5}, policy=JobPolicy(({"tracking": {"report_to": ["mlflow"]}},)))
    in_s3 = in_s3.model_copy(update={"output": "s3://bucket/runs/x"})
    env = job_environment(in_s3, server_env, ["OPERATOR_EXTRA"])
    assert {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_TOKEN", "OPERATOR_EXTRA"} <= set(env)
    assert not {"PGPASSWORD", "KUBETUNE_API_KEY", "OPENAI_API_KEY", "DATABASE_URL", "HF_TOKEN",
                "WANDB_API_KEY"} & set(env)


def test_paths_are_redacted_from_what_a_tenant_reads() -> None:
    said = redact("cannot read /srv/kubetune/runs/ftjob-1/checkpoints/checkpoint-20/model.safetensors nor "
                  "s3://bucket/ft/files/file-9/rows.jsonl; rows.jsonl:3: bad role; 3/4 done; ~/x/y")
    assert said == "cannot read model.safetensors nor rows.jsonl; rows.jsonl:3: bad role; 3/4 done; y"


def test_json_nesting_is_measured_without_parsing() -> None:
    assert json_depth(b'{"a": [1, {"b": "[[[[ not nesting"}]}') == 3
    assert json_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000
    assert json_depth(b'"\\"[["') == 0


def test_uploads_are_checked_a_line_at_a_time(tmp_path: Path) -> None:
    def upload(data: bytes, name: str = "rows.jsonl") -> dict[str, Any]:
        return save_upload(io.BytesIO(data), name, str(tmp_path / "store"), "key-1", "fine-tune", 1 << 30)

    assert upload(b'{"messages": []}\n\n{"messages": []}\nnot json\n')["rows"] == 3
    assert upload(json.dumps([{"a": 1}, {"a": 2}]).encode(), "rows.json")["rows"] == 2
    for data, said in [(b'{"a": 1}\n[1, 2]\n', "rows.jsonl:2: rows must be JSON objects"),
                       (b"[" * 50_000 + b"]" * 50_000 + b"\n", "nested too deeply"),
                       (b"x" * (5 << 20) + b"\n", "rows.jsonl:1: a line longer than 4 MiB"),
                       (b'{"a": "\xff"}\n', "not UTF-8"), (b"\x00\x01", "binary file")]:
        with pytest.raises(UsageError, match=said):
            upload(data)
    assert not any(p.is_file() and p.name == "rows.jsonl" and p.stat().st_size > 1 << 20
                   for p in (tmp_path / "store").rglob("*"))
