"""`kubetune render --what setup`: what a namespace needs before a first submit, rendered from the
spec — and nothing secret in it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune.k8s.render import render
from kubetune.k8s.render.setup import role_rules
from kubetune.spec.load import load_spec

ROOT = Path(__file__).resolve().parents[2]
B = ROOT / "examples" / "b-summarise-qlora-serve.yaml"
FULL = ["kubernetes.namespace=team-a", "kubernetes.service_account=trainer",
        "kubernetes.cloud_identity=trainer@proj.iam.gserviceaccount.com",
        "kubernetes.operators=[alice@example.com, 'group:ml-team', 'serviceaccount:ci/tools']",
        "kubernetes.queue=team-a-queue", "kubernetes.cluster_queue=gpu-cluster-queue",
        "kubernetes.secrets.hf_token=hf/token", "kubernetes.secrets.storage=s3-creds",
        "kubernetes.secrets.api_key=serving/key", "kubernetes.secrets.wandb=hf/wandb"]


def setup(*overrides: str) -> dict[str, dict[str, Any]]:
    objects = render(load_spec(B, list(overrides)), "setup")
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}


def test_the_namespace_gets_everything_the_walkthroughs_did_by_hand() -> None:
    objs = setup(*FULL)
    assert sorted(objs) == ["LocalQueue/team-a-queue", "Namespace/team-a", "Role/kubetune", "RoleBinding/kubetune",
                            "Secret/hf", "Secret/s3-creds", "Secret/serving", "ServiceAccount/trainer"]
    sa = objs["ServiceAccount/trainer"]["metadata"]
    assert sa["namespace"] == "team-a"
    assert sa["annotations"] == {"iam.gke.io/gcp-service-account": "trainer@proj.iam.gserviceaccount.com"}
    assert objs["LocalQueue/team-a-queue"]["spec"] == {"clusterQueue": "gpu-cluster-queue"}
    subjects = objs["RoleBinding/kubetune"]["subjects"]
    assert {"kind": "User", "name": "alice@example.com", "apiGroup": "rbac.authorization.k8s.io"} in subjects
    assert {"kind": "Group", "name": "ml-team", "apiGroup": "rbac.authorization.k8s.io"} in subjects
    assert {"kind": "ServiceAccount", "name": "tools", "namespace": "ci"} in subjects
    # placeholders only: every key the pods read, every value empty
    assert objs["Secret/hf"]["stringData"] == {"token": "", "wandb": ""}
    assert objs["Secret/s3-creds"]["stringData"] == {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    for name, obj in objs.items():
        if obj["kind"] != "LocalQueue":  # a Kueue CRD: not in the core schemas
            for version in ("1.29.0", "1.33.0"):
                kubernetes_validate.validate(obj, version, strict=True)
    eks = setup("kubernetes.service_account=trainer", "kubernetes.cloud_identity=arn:aws:iam::123456789012:role/train")
    assert eks["ServiceAccount/trainer"]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/train"}


def test_the_role_is_exactly_deploy_rbac_yaml() -> None:
    shipped = next(d for d in yaml.safe_load_all((ROOT / "deploy" / "rbac.yaml").read_text()) if d["kind"] == "Role")
    assert shipped["rules"] == role_rules() == setup()["Role/kubetune"]["rules"]


def test_planted_secret_values_never_reach_the_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"HF_TOKEN": "hf_planted_9", "AWS_SECRET_ACCESS_KEY": "planted-aws", "WANDB_API_KEY": "planted-wb"}.items():
        monkeypatch.setenv(key, value)
    text = yaml.safe_dump(list(setup(*FULL).values()))
    assert "planted" not in text and "hf_planted" not in text


def test_a_queue_needs_its_cluster_queue_and_identities_are_checked(cli, tmp_path: Path) -> None:
    code, _, err = cli("render", str(B), "--what", "setup", "--set", "kubernetes.queue=q")
    assert code == 2 and "kubernetes.cluster_queue" in err
    code, _, err = cli("render", str(B), "--what", "setup", "--set", "kubernetes.service_account=a",
                       "--set", "kubernetes.cloud_identity=someone@gmail.com")
    assert code == 2 and "kubernetes.cloud_identity" in err and "Traceback" not in err


def test_servicemonitor_grants_only_the_adapters_rules_and_deployment() -> None:
    objs = setup("serve.autoscaling.monitoring=servicemonitor", "kubernetes.operators=[alice]")
    role, binding = objs["Role/kubetune-adapter-rules"], objs["RoleBinding/kubetune-adapter-rules"]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "monitoring"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["prometheus-adapter"], "verbs": ["get", "patch"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["prometheus-adapter"],
         "verbs": ["get", "patch"]}]
    assert binding["subjects"] == [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}]
    assert "Role/kubetune-adapter-rules" not in setup("serve.autoscaling.monitoring=keda")
