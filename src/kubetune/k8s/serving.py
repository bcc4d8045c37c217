"""What `kubetune render --what serve` and `deploy` serve: the spec's own run, or the runs, model
folders and Hub models given with --run, each read from its own resolved spec (name, LoRA rank,
base, chat template) — never from the deploying spec's guesses. Several adapter runs of one base
(a rank sweep, say) become one Deployment with each adapter as a LoRA module under its run name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kubetune.k8s.render.serve import Served, check_served, served_run
from kubetune.serve.tool_parser import resolve_reasoning_parser, resolve_tool_parser
from kubetune.spec.models import RunSpec
from kubetune.runs.run import model_folder_name, read_run_spec
from kubetune.uris import hub_ref, is_hub, uri_basename


@dataclass(frozen=True)
class ServedSet:
    spec: RunSpec                 # the Deployment's spec: namespace, image, serve settings; named after a lone run
    served: list[Served]
    tool_parser: str | None
    reasoning_parser: str | None


def served_set(spec: RunSpec, runs: Sequence[str] = (), run_specs: Sequence[RunSpec] = ()) -> ServedSet:
    """`runs`: URIs (runs, model folders, hf://); `run_specs`: runs' resolved specs already known (a
    sweep's, computed like the sweep computed them: nothing read from storage)."""
    if run_specs:
        of_sweep = [served_run(s) for s in run_specs]
        check_served(of_sweep)
        return ServedSet(spec, of_sweep, resolve_tool_parser(run_specs[0]), resolve_reasoning_parser(run_specs[0]))
    if not runs:
        return ServedSet(spec, [served_run(spec)], resolve_tool_parser(spec), resolve_reasoning_parser(spec))
    served: list[Served] = []
    found: list[RunSpec | None] = []  # each URI's resolved spec; None for a whole model
    for uri in runs:
        run = None if is_hub(uri) else read_run_spec(uri)
        found.append(run)
        if run is None:  # a whole model: a folder, or a Hub model vLLM downloads itself
            repo, revision = (f"hf://{hub_ref(uri)[0]}", hub_ref(uri)[1]) if is_hub(uri) else (uri, None)
            name = uri_basename(repo) if is_hub(uri) else model_folder_name(uri)  # a run's merge: the run's name
            served.append(Served(name, repo, revision=revision))
        else:
            served.append(served_run(run, uri))
    check_served(served)
    first = found[0]
    if first is None:  # the parsers come from the model's own template (a folder, or the Hub cache / its name)
        model = spec.model.model_copy(update={"base": served[0].uri, "revision": served[0].revision,
                                              "chat_template": "auto"})
        source = spec.model_copy(update={"model": model})
    else:
        source = first
    deploying = spec
    if len(runs) == 1 and first is not None:  # one run: its Deployment, named after it
        deploying = spec.model_copy(update={"name": first.name, "model": first.model, "method": first.method})
    return ServedSet(deploying, served, resolve_tool_parser(source), resolve_reasoning_parser(source))
