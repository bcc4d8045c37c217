"""Render a run spec into Kubernetes objects. Pure: no network, no clock, no randomness — the same
spec gives the same bytes, so the output can live in Git and be reviewed as a diff."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import yaml

from kubetune.spec.models import RunSpec

if TYPE_CHECKING:
    from kubetune.k8s.render.serve import Served

WHATS = ("train", "stage", "serve", "setup")


def render(spec: RunSpec, what: str = "train", served: Sequence[Served] | None = None,
           tool_parser: str | None = None, reasoning_parser: str | None = None) -> list[dict[str, Any]]:
    """`served` (serve): what the Deployment serves, default the spec's own run; `tool_parser`,
    `reasoning_parser`: its vLLM parsers (resolved by the caller, which may read the runs' specs and
    chat templates; see kubetune.serve.tool_parser)."""
    from kubetune.k8s.render.serve import serve_objects
    from kubetune.k8s.render.train import stage_objects, train_objects

    if what == "train":
        return train_objects(spec)
    if what == "stage":
        return stage_objects(spec)
    if what == "serve":
        return serve_objects(spec, served, tool_parser=tool_parser, reasoning_parser=reasoning_parser)
    if what == "setup":
        from kubetune.k8s.render.setup import setup_objects

        return setup_objects(spec)
    raise ValueError(f"unknown kind of manifests {what!r}; one of {', '.join(WHATS)}")


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # containers sharing one env list are written out in full, not as &id001 anchors


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None  # the spec in the ConfigMap stays readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return "".join("---\n" + yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=120) for o in objects)
