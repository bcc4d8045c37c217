"""One function per verb: parse nothing, decide nothing — call the library, print, return a code."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune import settings
from kubetune.spec import load_spec
from kubetune.uris import has_scheme

if TYPE_CHECKING:
    from kubetune.spec.models import RunSpec


def validate(args: argparse.Namespace) -> int:
    from kubetune.train.plan import validate as check

    print(*check(load_spec(args.spec, args.overrides), args.spec), sep="\n")
    return 0


def plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kubetune.train.plan import plan_report, sample_lines

    spec = load_spec(args.spec, args.overrides)
    if args.json:
        print(*sample_lines(spec, args.show if args.show is not None else 1), sep="\n")
        return 0
    console = Console(highlight=False, soft_wrap=True)
    for line in plan_report(spec, color=console.is_terminal, show=args.show, local=args.target != "k8s"):
        console.print(line, markup=False) if isinstance(line, str) else console.print(line)
    if args.target == "k8s":
        from kubetune.k8s.render import render as render_objects, to_yaml

        from kubetune.k8s.render.image import dist_name, installs_at_start

        from kubetune.k8s.storage import sized

        console.print("\nmanifests (kubetune render):", markup=False)
        console.print(to_yaml(render_objects(sized(spec), "train")), markup=False, highlight=False)
        if installs_at_start(spec):
            console.print(f"# and the ConfigMap {dist_name(spec.name)}-KEY: this kubetune's wheel and pins, which the pod "
                          "installs at start (kubetune render and submit include it)", markup=False)
    return 0


def schema(args: argparse.Namespace) -> int:
    if args.events:
        from kubetune.artifacts.events import events_schema

        print(json.dumps(events_schema(), indent=2))
        return 0
    from kubetune.spec.models import RunSpec

    print(json.dumps(RunSpec.model_json_schema(), indent=2))
    return 0


def train(args: argparse.Namespace) -> int:
    from kubetune.launch import Launch, launcher_for

    spec = load_spec(args.spec, args.overrides)
    return launcher_for(spec, "local").launch(Launch(spec, args.spec, tuple(args.overrides), wait=args.wait))


def export(args: argparse.Namespace) -> int:
    from kubetune.train.export import export_checkpoint

    out = export_checkpoint(Path(args.checkpoint), Path(args.to) if args.to else None)
    print(f"exported {args.checkpoint} to {out}")
    return 0


def merge(args: argparse.Namespace) -> int:
    from kubetune.train.merge import merge_run

    result = merge_run(args.run, tolerance=args.tolerance, check=args.check)
    whole = (f"max |logit diff| vs adapter-on-base: {result.max_diff:.2e}" if result.max_diff is not None
             else "whole-model logits not checked (--check layers, or the model does not fit twice in memory "
                  "in fp32)")
    print(f"merged into {result.path}  ({whole}; worst layer vs PEFT's LoRA forward: {result.layer_diff:.1e}; "
          f"held one weight at a time, the largest {result.largest_weight / 2**20:,.1f} MiB in fp32)")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from kubetune.evaluate.run import evaluate_run

    result = evaluate_run(args.run, compare_base=args.base)
    print(f"written: {result.folder}/metrics.json, samples.jsonl, report.md")
    return 0


def stage(args: argparse.Namespace) -> int:
    from kubetune.runs.run import apply_storage_env
    from kubetune.storage.stage import deliveries, stage as run_stage

    spec = load_spec(args.spec, args.overrides) if args.spec else None
    if spec is not None:
        apply_storage_env(spec)
    items, exclude = deliveries(spec, args.model, args.data, args.to, args.exclude)
    report = run_stage(items, exclude)
    print(report.summary())
    for item in items:
        print(f"  {item.what}: {item.dest}")
    return 0


def push(args: argparse.Namespace) -> int:
    from kubetune.runs.push import push as run_push

    print(f"published: {run_push(args.run, args.to, private=not args.public)}")
    return 0


def render(args: argparse.Namespace) -> int:
    from kubetune.k8s.dist import with_dist
    from kubetune.k8s.render import render as render_objects, to_yaml

    from kubetune.k8s.storage import sized

    spec = load_spec(args.spec, args.overrides)
    if args.what == "serve":
        plan = _served_set(spec, args)
        plan = replace(plan, spec=sized(plan.spec, plan.served))
        objects = render_objects(plan.spec, "serve", plan.served, plan.tool_parser, plan.reasoning_parser)
        _say_unserved_metric(plan.spec)
    else:
        if args.what == "train":
            _check_cluster_memory(spec)
        spec = sized(spec)
        objects = render_objects(spec, args.what)
    sys.stdout.write(to_yaml(with_dist(spec, objects)))
    if args.what != "setup":
        _say_install_at_start(spec)
    if not has_scheme(spec.output_uri):  # stderr: stdout stays valid YAML for kubectl
        print(f"note: output {spec.output_uri} is a local path: in a pod it lives on the scratch volume and is lost "
              "with the pod, and a retried pod starts over; use --set output=s3://... (or gs://, pvc://)", file=sys.stderr)
    return 0


def _say_install_at_start(spec: RunSpec) -> None:
    """Pods that install kubetune at start with nowhere to keep it install again on every retry: say so (stderr)."""
    from kubetune.k8s.render.image import installs_at_start

    if installs_at_start(spec) and not spec.kubernetes.install_cache:
        print("note: kubernetes.image and kubernetes.install_cache are unset: each pod (a retried one too) installs "
              "kubetune and its pinned dependencies (2-3 GiB) when it starts; set kubernetes.install_cache to a "
              "PVC to install once, or kubernetes.image to an image with kubetune (docs/kubernetes.md)",
              file=sys.stderr)


def _say_unserved_metric(spec: RunSpec) -> None:
    """An HPA on a per-pod vLLM metric scales only where something serves that metric through the
    custom metrics API; with monitoring none, kubetune renders nothing that does: say so (stderr)."""
    a = spec.serve.autoscaling
    if a is not None and a.monitoring == "none":
        print(f"note: the HorizontalPodAutoscaler scales on the pods' vllm metric ({a.metric}) through the custom "
              "metrics API, and with serve.autoscaling.monitoring: none nothing rendered here makes Prometheus "
              "scrape the pods or serves that metric: it stays at serve.autoscaling.min replicas unless the cluster "
              "already does both. Set serve.autoscaling.monitoring: keda (KEDA + prometheus-operator: nothing to "
              "configure), servicemonitor (prometheus-operator + Prometheus Adapter) or podmonitoring (GKE managed "
              "Prometheus + its custom-metrics adapter); `kubetune doctor SPEC` checks the metrics API and says "
              "which this cluster has", file=sys.stderr)


def submit(args: argparse.Namespace) -> int:
    from kubetune.launch import Launch, launcher_for

    from kubetune.k8s.storage import sized

    spec = load_spec(args.spec, args.overrides)
    sizes = sized(spec)  # a size set too small is refused here; the launcher sizes against the cluster's Job
    _check_cluster_memory(spec)
    _say_install_at_start(spec)
    if args.dry_run:
        from kubetune.k8s.dist import with_dist
        from kubetune.k8s.render import render as render_objects

        return _dry_run(with_dist(sizes, render_objects(sizes, "train")), spec.kubernetes.namespace, args.spec)
    code = launcher_for(spec, "k8s").launch(Launch(spec, args.spec, tuple(args.overrides)))
    print(f"follow it: kubetune status {spec.name} -n {spec.kubernetes.namespace}")
    return code


def _dry_run(objects: list[dict[str, Any]], namespace: str, spec_path: str) -> int:
    """What an apply would do, from the rendered objects alone (no cluster is contacted)."""
    for obj in objects:
        print(f"{obj['kind'].lower()}/{obj['metadata']['name']} would be applied in namespace {namespace}")
    print(f"dry run: nothing was applied ({len(objects)} objects; `kubetune render {spec_path}` prints them)")
    return 0


def _check_cluster_memory(spec: Any) -> None:
    """A run whose memory plan cannot fit the cluster's devices is refused before anything is created
    (exit 2, with the fixes); unknown devices or an unreadable base config are not checked."""
    from kubetune.train.memory import check_fits, plan_for_cluster

    plan = plan_for_cluster(spec)
    if plan is not None:
        check_fits(spec, plan)


def _served_set(spec: Any, args: argparse.Namespace) -> Any:
    """--run URIs, or --grid: every run of that sweep of SPEC (their specs computed as the sweep does)."""
    from kubetune.k8s.serving import served_set

    if getattr(args, "grid", None):
        from kubetune.errors import UsageError
        from kubetune.sweep import parse_grid, plan_sweep

        if args.run:
            raise UsageError("give --run or --grid, not both")
        _, runs = plan_sweep(args.spec, parse_grid(args.grid), args.overrides)
        return served_set(spec, run_specs=[load_spec(args.spec, list(r.overrides)) for r in runs])
    return served_set(spec, args.run or ())


def setup(args: argparse.Namespace) -> int:
    from kubetune.k8s.client import Cluster
    from kubetune.k8s.render import render as render_objects

    spec = load_spec(args.spec, args.overrides)
    for line in Cluster(spec.kubernetes.namespace).apply(render_objects(spec, "setup")):
        print(line)
    print(f"next: fill in the Secrets' values (kubectl -n {spec.kubernetes.namespace} edit secret ...), "
          f"then `kubetune doctor {args.spec}`")
    return 0


def doctor(args: argparse.Namespace) -> int:
    from kubetune.k8s.client import Cluster
    from kubetune.k8s.doctor import doctor as run_doctor, format_checks

    spec = load_spec(args.spec, args.overrides) if args.spec else None
    namespace = spec.kubernetes.namespace if spec else args.namespace
    if args.probe and spec is None:
        from kubetune.errors import UsageError

        raise UsageError("--probe needs a SPEC: the probe pod runs the run's image under its identity")
    checks = run_doctor(Cluster(namespace), spec, probe=args.probe, probe_timeout=args.probe_timeout,
                        poll=args.probe_poll)
    print(format_checks(checks))
    failed = sum(1 for c in checks if not c.ok)
    print(f"{len(checks) - failed} of {len(checks)} checks pass" + (f"; {failed} to fix" if failed else ""))
    return 2 if failed else 0


def copy(args: argparse.Namespace) -> int:
    from kubetune.k8s.client import Cluster
    from kubetune.k8s.pvc_copy import copy as run_copy
    from kubetune.spec.models import KubernetesSpec

    k = load_spec(args.spec, args.overrides).kubernetes if args.spec else KubernetesSpec(namespace=args.namespace)
    report = run_copy(Cluster(k.namespace), k, args.source, args.destination, timeout=args.timeout,
                      poll=args.poll)
    print(report.summary())
    return 0


def image_build(args: argparse.Namespace) -> int:
    from kubetune.errors import UsageError
    from kubetune.k8s.image_build import build

    if args.tool == "none" and not args.context:
        raise UsageError("--tool none writes the build context only: give --context DIR")
    build(args.accelerator, args.tag, push=args.push, tool=args.tool,
          context=Path(args.context) if args.context else None)
    print(f"then: kubernetes: {{image: {args.tag}}} in the spec (`kubetune doctor SPEC --probe` checks the "
          "cluster pulls it)")
    return 0


def deploy(args: argparse.Namespace) -> int:
    from kubetune.k8s.autoscalers import prune_autoscalers
    from kubetune.k8s.client import Cluster
    from kubetune.k8s.dist import with_dist
    from kubetune.k8s.render import render as render_objects
    from kubetune.k8s.storage import sized

    plan = _served_set(load_spec(args.spec, args.overrides), args)
    plan = replace(plan, spec=sized(plan.spec, plan.served))
    ns = plan.spec.kubernetes.namespace
    objects = with_dist(plan.spec, render_objects(plan.spec, "serve", plan.served, plan.tool_parser,
                                                  plan.reasoning_parser))
    _say_unserved_metric(plan.spec)
    _say_install_at_start(plan.spec)
    if args.dry_run:
        return _dry_run(objects, ns, args.spec)
    cluster = Cluster(ns)
    for line in cluster.apply(objects):
        print(line)
    for line in prune_autoscalers(cluster, f"{plan.spec.name}-serve", objects):
        print(line)
    a = plan.spec.serve.autoscaling
    if a is not None and a.monitoring == "servicemonitor":
        from kubetune.k8s.adapter_rules import add_adapter_rule

        print(add_adapter_rule(cluster, plan.spec))
    port = plan.spec.serve.port
    print(f"try it:\n  kubectl -n {ns} port-forward service/{plan.spec.name}-serve {port}:{port}\n"
          f"  kubetune chat http://127.0.0.1:{port} --model {plan.served[0].name} \"Hello\"")
    return 0


def status(args: argparse.Namespace) -> int:
    from kubetune.k8s.client import Cluster
    from kubetune.k8s.status import format_status, run_status

    print(format_status(run_status(Cluster(args.namespace), args.name)))
    return 0


def logs(args: argparse.Namespace) -> int:
    from kubetune.k8s.client import Cluster

    for chunk in Cluster(args.namespace).follow_log(args.name, args.follow, lambda m: print(m, file=sys.stderr)):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def cancel(args: argparse.Namespace) -> int:
    from kubetune.k8s.client import Cluster

    for line in Cluster(args.namespace).delete_run(args.name):
        print(line)
    return 0


def list_runs(args: argparse.Namespace) -> int:
    from kubetune.k8s.client import Cluster
    from kubetune.k8s.status import format_runs

    print(format_runs(Cluster(args.namespace).jobs(), args.namespace))
    return 0


def sweep(args: argparse.Namespace) -> int:
    from kubetune import sweep as sw

    status_mode, spec_path = sw.parse_command(args.words)
    spec, runs = sw.plan_sweep(spec_path, sw.parse_grid(args.grid), args.overrides)
    if status_mode:
        metric, rows = sw.ranking(spec_path, runs, args.metric)
        print(sw.format_ranking(metric, rows))
        return 0
    print(f"sweep {spec.name}: {len(runs)} runs ({', '.join(r.name for r in runs)})")
    if args.dry_run:
        sys.stdout.write(sw.dump_plan(runs))
        if args.target == "k8s":  # each run's objects, checked and rendered as its submit would (no cluster)
            from kubetune.k8s.dist import with_dist
            from kubetune.k8s.render import render as render_objects
            from kubetune.k8s.storage import sized

            for r in runs:
                run_spec = sized(load_spec(spec_path, list(r.overrides)))
                _check_cluster_memory(run_spec)
                _dry_run(with_dist(run_spec, render_objects(run_spec, "train")), run_spec.kubernetes.namespace,
                         spec_path)
        return 0
    if args.target == "k8s":
        sw.submit_k8s(spec_path, runs)
        print(f"rank them when they finish: kubetune sweep status {spec_path} {' '.join('--grid ' + g for g in args.grid)}")
        return 0
    codes = sw.run_local(spec_path, runs, args.parallel)
    failed = [n for n, c in codes.items() if c]
    print(f"{len(codes) - len(failed)} finished, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


def serve(args: argparse.Namespace) -> int:
    from kubetune.serve.server import ServeOptions, serve as run_server

    run_server(args.targets, ServeOptions(host=args.host, port=args.port, engine=args.engine,
                                          served_name=args.served_name, max_concurrency=args.max_concurrency,
                                          api_key=args.api_key, with_base=args.with_base,
                                          adapters=args.adapters, workers=args.workers,
                                          metrics_auth=args.metrics_auth))
    return 0


def server(args: argparse.Namespace) -> int:
    from kubetune.control.server import ServerOptions, create_key, list_keys, serve_control

    if getattr(args, "server_command", None) == "key":
        options = ServerOptions(home=Path(args.home), database=args.database)
        if args.action == "create":
            print(create_key(options, args.name))
            print("(shown once; the server stores only its hash. Send it as Authorization: Bearer KEY)",
                  file=sys.stderr)
        else:
            for row in list_keys(options):
                print(f"{row['id']}  {row['name']}")
        return 0
    serve_control(ServerOptions(
        host=args.host, port=args.port, home=Path(args.home), storage=args.storage, database=args.database,
        api_keys=list(args.api_keys), concurrency=args.concurrency, max_upload_mb=args.max_upload_mb,
        worker_id=args.worker_id, max_concurrency=args.max_concurrency, runs=list(args.runs), backend=args.backend,
        namespace=args.namespace, clusters=list(args.clusters), config=args.config, models_root=args.models_root))
    return 0


def serve_adapters(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kubetune.serve.adapter_sync import run_sync

    def say(text: str) -> None:
        print(text, flush=True)

    run_sync(Path(args.file), args.vllm, args.interval, os.environ.get("VLLM_API_KEY"), args.once, say)
    return 0


def chat(args: argparse.Namespace) -> int:
    from kubetune.errors import UsageError
    from kubetune.serve.client import is_url

    url = is_url(args.target)
    if url and (args.base or args.compare):
        raise UsageError("--base/--compare apply to a run folder; for a server pass --model NAME")
    if args.messages and not url:  # one-shot questions to a run: batched, in this process
        from kubetune.evaluate.generate import compare_answers

        which = ["base", "tuned"] if args.compare else (["base"] if args.base else ["tuned"])
        print(*compare_answers(args.target, args.messages, which, args.system, args.max_new_tokens), sep="\n")
        return 0
    from kubetune.serve.client import backend_for, converse, stream_answer

    api_key = args.api_key or settings.api_key() or os.environ.get("OPENAI_API_KEY")
    backend = backend_for(args.target, args.model, api_key, base=args.base)
    system = [{"role": "system", "content": args.system}] if args.system else []
    for msg in args.messages:
        stream_answer(backend, [*system, {"role": "user", "content": msg}], args.max_new_tokens)
    if not args.messages:
        converse(backend, system, args.max_new_tokens, tty=sys.stdin.isatty())
    return 0
