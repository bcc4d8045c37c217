"""One function per verb: parse nothing, decide nothing — call the library, print, return a code."""

from __future__ import annotations

import argparse
import os
import json
import sys

from kubetune import settings
from kubetune.spec import load_spec


def _data_summary(prepared: object) -> list[str]:
    from kubetune.data.prepare import Prepared

    assert isinstance(prepared, Prepared)
    lines = []
    for src in prepared.samples.sources:
        skipped = f", {src.skipped} skipped" if src.skipped else ""
        lines.append(f"  {src.uri}: {src.format}, {src.used} rows{skipped}, weight {src.weight:g}")
    tr = prepared.train
    st = tr.stats()
    lines.append(f"  train rows {len(tr.rows)}, eval rows {len(prepared.eval.rows)}")
    lines.append(f"  tokens per row: min {st['min']}  p50 {st['p50']}  p95 {st['p95']}  max {st['max']}")
    lines.append(f"  over max_length: {tr.truncated} truncated, {tr.dropped} dropped (of {tr.total})")
    lines.append(f"  chat template: {prepared.formatter.template_source}")
    return lines


def validate(args: argparse.Namespace) -> int:
    from kubetune.data.prepare import prepare
    from kubetune.train.runner import preflight

    spec = load_spec(args.spec, args.overrides)
    output = preflight(spec)
    prepared = prepare(spec)
    print(f"ok: {args.spec} (run {spec.name} → {output.uri})")
    for line in _data_summary(prepared):
        print(line)
    if prepared.samples.skipped:
        print(f"  skipped {len(prepared.samples.skipped)} bad rows (data.bad_rows: skip)")
    return 0


def plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kubetune.data.prepare import prepare
    from kubetune.train.plan import make_plan, render_sample

    spec = load_spec(args.spec, args.overrides)
    prepared = prepare(spec)
    p = make_plan(spec, prepared)
    console = Console(highlight=False, soft_wrap=True)
    color = console.is_terminal
    console.print(f"[bold]plan for {spec.name}[/bold]  (nothing is trained)")
    console.print("\n".join(_data_summary(prepared)), markup=False)
    d = p.as_dict()
    console.print(f"  truncated {d['truncated_pct']}%  dropped {d['dropped_pct']}%", markup=False)
    console.print(f"  method {spec.method.type}; {p.params:,} parameters; world size {p.batches.world_size}", markup=False)
    console.print(f"  batch: {p.batches.per_device} per device x {p.batches.accumulation} accumulation x "
                  f"{p.batches.world_size} devices = {p.batches.total}", markup=False)
    console.print(f"  optimizer steps: {p.steps}", markup=False)
    console.print(f"  rough time: {_duration(p.est_seconds)}", markup=False)
    if p.sample is not None:
        legend = "green = trained, dim = masked" if color else "⟦trained⟧, the rest masked"
        console.print(f"\nsample ({p.sample.where}; {legend}):", markup=False)
        console.print(render_sample(p, color))
    if getattr(args, "target", "local") == "k8s":
        from kubetune.k8s.render import render as render_objects, to_yaml

        console.print("\nmanifests (kubetune render):", markup=False)
        console.print(to_yaml(render_objects(spec, "train")), markup=False, highlight=False)
    return 0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


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


def merge(args: argparse.Namespace) -> int:
    from kubetune.train.merge import merge_run

    result = merge_run(args.run, tolerance=args.tolerance)
    print(f"merged into {result.path}  (max |logit diff| vs adapter-on-base: {result.max_diff:.2e})")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from kubetune.evaluate.run import evaluate_run

    result = evaluate_run(args.run, compare_base=args.base)
    print(f"written: {result.folder}/metrics.json, samples.jsonl, report.md")
    return 0


def stage(args: argparse.Namespace) -> int:
    from kubetune.storage.stage import deliveries_from_flags, deliveries_from_spec, stage as run_stage

    if args.spec and (args.model or args.data or args.to):
        print("give a SPEC, or --model/--data with --to, not both", file=sys.stderr)
        return 2
    exclude = args.exclude
    if args.spec:
        from kubetune.storage.runs import apply_storage_env

        spec = load_spec(args.spec, args.overrides)
        apply_storage_env(spec)
        items = deliveries_from_spec(spec)
        exclude = exclude if exclude is not None else spec.stage.exclude
    elif args.to:
        items = deliveries_from_flags(args.model, args.data, args.to)
    else:
        print("give a SPEC, or --model/--data with --to", file=sys.stderr)
        return 2
    from kubetune.spec.models import StageSpec

    report = run_stage(items, exclude if exclude is not None else StageSpec().exclude)
    print(report.summary())
    for item in items:
        print(f"  {item.what}: {item.dest}")
    return 0


def push(args: argparse.Namespace) -> int:
    from kubetune.storage.push import push as run_push

    where = run_push(args.run, args.to, private=not args.public)
    print(f"published: {where}")
    return 0


def render(args: argparse.Namespace) -> int:
    from kubetune.k8s.render import render as render_objects, to_yaml

    spec = load_spec(args.spec, args.overrides)
    sys.stdout.write(to_yaml(render_objects(spec, args.what, args.run)))
    if "://" not in spec.output_uri:  # stderr: stdout stays valid YAML for kubectl
        print(f"note: output {spec.output_uri} is a local path: in a pod it lives on the scratch volume and is lost "
              "with the pod, and a retried pod starts over; use --set output=s3://... (or gs://, pvc://)", file=sys.stderr)
    return 0


def submit(args: argparse.Namespace) -> int:
    from kubetune.launch import Launch, launcher_for

    spec = load_spec(args.spec, args.overrides)
    code = launcher_for(spec, "k8s").launch(Launch(spec, args.spec, tuple(args.overrides)))
    print(f"follow it: kubetune status {spec.name} -n {spec.kubernetes.namespace}")
    return code


def deploy(args: argparse.Namespace) -> int:
    from kubetune.k8s.client import Cluster
    from kubetune.k8s.render import render as render_objects

    spec = load_spec(args.spec, args.overrides)
    ns = spec.kubernetes.namespace
    for line in Cluster(ns).apply(render_objects(spec, "serve", args.run)):
        print(line)
    port = spec.serve.port
    print(f"try it:\n  kubectl -n {ns} port-forward service/{spec.name}-serve {port}:{port}\n"
          f"  kubetune chat http://127.0.0.1:{port} --model {spec.name} \"Hello\"")
    return 0


def status(args: argparse.Namespace) -> int:
    from kubetune.k8s.client import Cluster
    from kubetune.k8s.status import format_status, run_status

    print(format_status(run_status(Cluster(args.namespace), args.name)))
    return 0


def logs(args: argparse.Namespace) -> int:
    from kubetune.k8s.client import Cluster

    cluster = Cluster(args.namespace)
    pods = cluster.pods(args.name)
    if args.follow and not any(p.status and p.status.phase != "Pending" for p in pods):
        print(f"waiting for a pod of {args.name} to start ...", file=sys.stderr)
        pod = cluster.wait_for_pod(args.name)
        pods = [pod] if pod is not None else pods
    if not pods:
        print(f"run {args.name} has no pods yet (kubetune status {args.name})", file=sys.stderr)
        return 1
    for chunk in cluster.log(pods[0].metadata.name, follow=args.follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def cancel(args: argparse.Namespace) -> int:
    from kubetune.k8s.client import Cluster

    for line in Cluster(args.namespace).delete_run(args.name):
        print(line)
    return 0


def list_runs(args: argparse.Namespace) -> int:
    from kubetune.k8s.client import Cluster, job_phase

    jobs = Cluster(args.namespace).jobs()
    if not jobs:
        print(f"no kubetune runs in namespace {args.namespace}")
        return 0
    print(f"{'RUN':<40} {'PHASE':<10} {'COMPONENT':<10}")
    for job in sorted(jobs, key=lambda j: j.metadata.name):
        labels = job.metadata.labels or {}
        print(f"{labels.get('kubetune.dev/run', job.metadata.name):<40} {job_phase(job):<10} "
              f"{labels.get('app.kubernetes.io/component', ''):<10}")
    return 0


def sweep(args: argparse.Namespace) -> int:
    from kubetune import sweep as sw

    words = list(args.words)
    status_mode = words[0] == "status"
    if status_mode:
        words = words[1:]
    if len(words) != 1:
        print("usage: kubetune sweep [status] SPEC --grid KEY=V1,V2 ...", file=sys.stderr)
        return 2
    spec, runs = sw.plan_sweep(words[0], sw.parse_grid(args.grid), args.overrides)
    if status_mode:
        metric, rows = sw.ranking(words[0], runs, args.metric)
        print(sw.format_ranking(metric, rows))
        return 0
    print(f"sweep {spec.name}: {len(runs)} runs ({', '.join(r.name for r in runs)})")
    if args.dry_run:
        sys.stdout.write(sw.dump_plan(runs))
        return 0
    if args.target == "k8s":
        sw.submit_k8s(words[0], runs)
        print(f"rank them when they finish: kubetune sweep status {words[0]} {' '.join('--grid ' + g for g in args.grid)}")
        return 0
    codes = sw.run_local(words[0], runs, args.parallel)
    failed = [n for n, c in codes.items() if c]
    print(f"{len(codes) - len(failed)} finished, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


def serve(args: argparse.Namespace) -> int:
    from kubetune.serve.server import ServeOptions, serve as run_server

    run_server(args.targets, ServeOptions(host=args.host, port=args.port, engine=args.engine,
                                          served_name=args.served_name, max_concurrency=args.max_concurrency,
                                          api_key=args.api_key, with_base=args.with_base))
    return 0


def chat(args: argparse.Namespace) -> int:
    from kubetune.serve.client import is_url

    if is_url(args.target) and (args.base or args.compare):
        print("--base/--compare apply to a run folder; for a server pass --model NAME", file=sys.stderr)
        return 2
    if args.messages and not is_url(args.target):
        return _answer_run(args)
    from kubetune.serve.client import backend_for

    api_key = args.api_key or settings.api_key() or os.environ.get("OPENAI_API_KEY")
    backend = backend_for(args.target, args.model, api_key, base=args.base)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.messages:
        for msg in args.messages:
            _stream_answer(backend, [*system, {"role": "user", "content": msg}], args.max_new_tokens)
        return 0
    return _interactive(backend, system, args.max_new_tokens)


def _stream_answer(backend: object, messages: list[dict[str, str]], max_tokens: int) -> str:
    parts = []
    for delta in backend.stream(messages, max_tokens):  # type: ignore[attr-defined]
        parts.append(delta)
        print(delta, end="", flush=True)
    print()
    return "".join(parts)


def _interactive(backend: object, system: list[dict[str, str]], max_tokens: int) -> int:
    """A conversation that keeps its history; an empty line or EOF (Ctrl-D) ends it."""
    tty = sys.stdin.isatty()
    if tty:
        print(f"chatting with {backend.model} (empty line or Ctrl-D to quit)")  # type: ignore[attr-defined]
    history = list(system)
    while True:
        try:
            line = input("you> " if tty else "")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        if tty:
            print(f"{backend.model}> ", end="", flush=True)  # type: ignore[attr-defined]
        history.append({"role": "assistant", "content": _stream_answer(backend, history, max_tokens)})
    return 0


def _answer_run(args: argparse.Namespace) -> int:
    """One-shot questions to a run folder, batched (and base vs tuned with --compare)."""
    from kubetune.evaluate.generate import answer_locally

    which = ["base", "tuned"] if args.compare else (["base"] if args.base else ["tuned"])
    answers = {w: answer_locally(args.target, args.messages, base=(w == "base"), system=args.system,
                                 max_new_tokens=args.max_new_tokens) for w in which}
    for i, msg in enumerate(args.messages):
        if len(which) == 1:
            print(answers[which[0]][i])
            continue
        print(f"> {msg}")
        for w in which:
            print(f"  {w:>5}: {answers[w][i]}")
    return 0
