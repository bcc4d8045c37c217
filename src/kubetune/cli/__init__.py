"""kubetune's command line: a table of verbs, each a thin function over the library.

`main(argv) -> int` is testable without a subprocess. Heavy imports (torch, transformers) happen
inside the verbs that need them, so `--help`, `validate` and `schema` start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

from kubetune import __version__, settings
from kubetune.errors import EXIT_FAILURE, EXIT_USAGE, KubetuneError

__all__ = ["main", "run"]


def _workers(value: str) -> str | int:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a number of processes (1 or more) or auto")
    return int(value)


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="run spec YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field by dotted path, YAML-typed (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from kubetune.cli import verbs

    parser = argparse.ArgumentParser(prog="kubetune", description="Fine-tune, evaluate and serve open LLMs from one spec.")
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    table: list[tuple[str, str, Callable[..., int], bool]] = [
        ("validate", "check the spec and its data; list every problem", verbs.validate, True),
        ("plan", "dry run: a rendered sample with its loss mask, token stats, steps, time estimate", verbs.plan, True),
        ("train", "train here (torchrun for several local devices)", verbs.train, True),
    ]
    for name, help_text, func, takes_spec in table:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if takes_spec:
            _spec_args(p)
        if name == "train":
            p.add_argument("--wait", action="store_true",
                           help="if another trainer is writing this run, wait until it is done (or its lease "
                                "lapses) instead of exiting with code 75")
        if name == "plan":
            p.add_argument("--target", choices=["local", "k8s"], default="local",
                           help="k8s: also print the manifests `kubetune render` would apply")
            p.add_argument("--show", type=int, metavar="N", help="show the first N training samples with their loss "
                                                                 "masks (a split conversation: one per turn)")
            p.add_argument("--json", action="store_true", help="with --show: only the samples, one JSON line each: "
                                                               '{"where", "segments": [{"text", "trained"}]}')
        p.set_defaults(func=func)
    p = sub.add_parser("schema", help="JSON Schema of the run spec (or of events.jsonl)",
                       description="JSON Schema of the run spec, or with --events of one line of a run's events.jsonl")
    p.add_argument("--events", action="store_true", help="the schema of events.jsonl instead")
    p.set_defaults(func=verbs.schema)
    p = sub.add_parser("merge", help="merge a run's adapter into its base model (final/merged)")
    p.add_argument("run", help="run folder or URI, e.g. runs/NAME or s3://bucket/runs/NAME")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest |logit difference| allowed, as a fraction of the logits' scale (their RMS, at least 1); "
                        "computed in fp32")
    p.add_argument("--check", choices=["auto", "logits", "layers"], default="auto",
                   help="layers: every merged weight exact to its dtype and against PEFT's LoRA forward (always done; "
                        "memory: one weight); "
                        "logits: also the whole model's logits against adapter-on-base in fp32 (memory: the model "
                        "twice in fp32); auto: logits when that fits in free memory")
    p.set_defaults(func=verbs.merge)
    p = sub.add_parser("export", help="a sharded (FSDP) checkpoint as a Hugging Face folder: the model or adapter, "
                                      "tokenizer and chat template")
    p.add_argument("checkpoint", help="RUN/checkpoints/checkpoint-N (complete, saved with resources.strategy: fsdp)")
    p.add_argument("--to", help="output folder (default: RUN/exported/checkpoint-N); never overwritten")
    p.set_defaults(func=verbs.export)
    p = sub.add_parser("eval", help="eval loss/perplexity, ROUGE and exact match: base vs tuned → RUN/eval/")
    p.add_argument("run", help="run folder or URI, e.g. runs/NAME or s3://bucket/runs/NAME")
    p.add_argument("--base", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate the base model on the same samples (default: yes)")
    p.set_defaults(func=verbs.evaluate)
    p = sub.add_parser("stage", help="deliver the base model and datasets to the storage the run reads from",
                       description="copy stage.model → model.base and stage.data → data.train (or --model/--data → --to); "
                                   "identical files are skipped, so a re-run resumes")
    p.add_argument("spec", nargs="?", help="run spec YAML (its stage: section)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--model", action="append", default=[], help="model URI to deliver (hf://org/name, s3://..., a folder; repeatable)")
    p.add_argument("--data", action="append", default=[], help="dataset URI to deliver (repeatable)")
    p.add_argument("--to", help="destination prefix (s3://bucket/prefix, gs://..., pvc://..., a folder)")
    p.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                   help="files not to copy (default: the spec's stage.exclude, or original/*, *.pth, consolidated.*)")
    p.set_defaults(func=verbs.stage)
    p = sub.add_parser("push", help="publish a run's merged model or adapter to the Hub (hf://org/name) or a bucket")
    p.add_argument("run", help="run folder or URI")
    p.add_argument("--to", required=True, help="hf://ORG/NAME, or s3://... / gs://... / a folder")
    p.add_argument("--public", action="store_true", help="create the Hub repository public (default: private)")
    p.set_defaults(func=verbs.push)
    p = sub.add_parser("render", help="print Kubernetes manifests for kubectl apply -f - (pure: no cluster needed)")
    _spec_args(p)
    p.add_argument("--what", choices=["train", "stage", "serve", "setup"], default="train")
    p.add_argument("--run", action="append", help="(serve) a run's output URI (its own resolved spec decides name, "
                   "rank and base), a model folder or hf://org/name; repeat for several adapter runs of one base "
                   "(one Deployment, each a LoRA module)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="(serve) every run of this sweep of SPEC, as in `kubetune sweep` (one Deployment)")
    p.set_defaults(func=verbs.render)
    p = sub.add_parser("submit", help="create or update the run's Kubernetes objects (idempotent by run name)")
    _spec_args(p)
    p.add_argument("--dry-run", action="store_true", help="check and render everything, list what would be applied; "
                   "contact no cluster, apply nothing")
    p.set_defaults(func=verbs.submit)
    p = sub.add_parser("setup", help="prepare a namespace: Namespace, ServiceAccount (cloud identity), Role and "
                       "RoleBinding, Kueue LocalQueue, Secret placeholders (server-side apply; Secrets never overwritten)")
    _spec_args(p)
    p.set_defaults(func=verbs.setup)
    p = sub.add_parser("doctor", help="check the cluster and storage before a first submit; exit 0 when all pass, 2 if not")
    p.add_argument("spec", nargs="?", help="run spec YAML (without one: the API and the verbs only)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("-n", "--namespace", default="default", help="without a SPEC: the namespace to check")
    p.add_argument("--probe", action="store_true",
                   help="also start a short pod with the run's image, service account, secrets and mounts that "
                        "checks its storage from inside the cluster (deleted afterwards)")
    p.add_argument("--probe-timeout", type=float, default=None,
                   help="seconds to wait for the probe pod (default: its deadline, 300 s, +600 s when it installs kubetune)")
    p.add_argument("--probe-poll", type=float, default=2.0, help=argparse.SUPPRESS)
    p.set_defaults(func=verbs.doctor)
    p = sub.add_parser("copy", help="copy files onto a PVC or out of one, through a short-lived data-access pod",
                       description="kubetune copy ./data pvc://CLAIM/datasets, kubetune copy pvc://CLAIM/runs/NAME ./runs/NAME. "
                                   "A pod mounts the claim (as the spec's non-root UID/GID/fsGroup) and serves its files "
                                   "through the API server's pod proxy to this command only; files already there with "
                                   "the same size are skipped, so a re-run continues; the pod is deleted at the end.")
    p.add_argument("source", help="a local file or folder, or pvc://CLAIM/path")
    p.add_argument("destination", help="pvc://CLAIM/path, or a local folder")
    p.add_argument("--spec", help="run spec YAML whose kubernetes: section gives the namespace, UID/GID/fsGroup and image")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("-n", "--namespace", default="default", help="without --spec: the namespace of the claim")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the pod to serve (default 300)")
    p.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(func=verbs.copy)
    image = sub.add_parser("image", help="build (and push) an image with this kubetune for kubernetes.image")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    p = image_sub.add_parser("build", help="the accelerator vendor's PyTorch image + this kubetune's wheel and pins",
                             description="kubetune image build --accelerator nvidia --tag REGISTRY/kubetune:0.1.0-cuda "
                                         "--push, then set kubernetes.image to that tag.")
    p.add_argument("--accelerator", required=True, choices=["nvidia", "amd", "gaudi", "cpu"])
    p.add_argument("--tag", required=True, help="the image's name, e.g. REGISTRY/kubetune:0.1.0-cuda")
    p.add_argument("--push", action="store_true", help="push the tag when it is built")
    p.add_argument("--tool", help="docker (default, else podman), podman, or none: only write --context")
    p.add_argument("--context", help="write the build context into this folder (kept) instead of a temporary one")
    p.set_defaults(func=verbs.image_build)
    p = sub.add_parser("deploy", help="serve a trained run on Kubernetes: vLLM Deployment, Service, HPA, PDB")
    _spec_args(p)
    p.add_argument("--run", action="append", help="a run's output URI, a model folder or hf://org/name; repeat for "
                   "several adapter runs of one base (one Deployment)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="every run of this sweep of SPEC, as in `kubetune sweep` (one Deployment)")
    p.add_argument("--dry-run", action="store_true", help="check and render everything, list what would be applied; "
                   "contact no cluster, apply nothing")
    p.set_defaults(func=verbs.deploy)
    for name, help_text, func in (("status", "phase, pods, step/total, loss, ETA and why a run waits", verbs.status),
                                  ("logs", "the leader pod's log", verbs.logs),
                                  ("cancel", "delete the run's Job and pods (storage is kept)", verbs.cancel)):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("name", help="run name")
        p.add_argument("-n", "--namespace", default="default")
        if name == "logs":
            p.add_argument("-f", "--follow", action="store_true", help="stream until the pod ends")
        p.set_defaults(func=func)
    p = sub.add_parser("list", help="kubetune runs in the namespace")
    p.add_argument("-n", "--namespace", default="default")
    p.set_defaults(func=verbs.list_runs)
    p = sub.add_parser("sweep", help="one run per grid combination (here or as Kubernetes Jobs); `sweep status` ranks them",
                       description="kubetune sweep SPEC --grid KEY=V1,V2 ... | kubetune sweep status SPEC --grid ... [--metric M]")
    p.add_argument("words", nargs="+", metavar="[status] SPEC")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="values of one field (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--target", choices=["local", "k8s"], default="local")
    p.add_argument("--parallel", type=int, default=1, help="local runs at a time")
    p.add_argument("--metric", help="(status) eval metric to rank by; default rougeL, else loss")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their overrides; start nothing")
    p.set_defaults(func=verbs.sweep)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a run (or a model folder)",
                       description="OpenAI-compatible HTTP server: /v1/models, /v1/chat/completions, "
                                   "/v1/completions, /tokenize, /health, /metrics")
    p.add_argument("targets", nargs="+", metavar="RUN|MODEL",
                   help="run folder(s) (several adapter runs of one base share it) or a model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto",
                   help="auto: vLLM when installed with a CUDA GPU, else transformers")
    p.add_argument("--served-model-name", dest="served_name", help="name in /v1/models (default: the run name)")
    p.add_argument("--max-concurrency", type=int, default=64,
                   help="requests admitted at once (generating or queued); one more gets HTTP 429")
    p.add_argument("--api-key", help="require this key (Bearer); default from KUBETUNE_API_KEY; needed to listen "
                                     "beyond loopback")
    p.add_argument("--metrics-auth", choices=["open", "key"], default="open",
                   help="open: /metrics answers without a key (Prometheus scrapes it); key: it needs the API key too")
    p.add_argument("--no-base", dest="with_base", action="store_false",
                   help="do not also serve the base model of an adapter run")
    p.add_argument("--adapters", choices=["auto", "merged", "unmerged"], default="auto",
                   help="(transformers engine) merged: each adapter merged into a copy of the base in memory "
                        "(logits checked); unmerged: LoRA applied on the base's shared weights (one copy); "
                        "auto: merged when the copies fit in half the free memory")
    p.add_argument("--workers", type=_workers, default="auto",
                   help="(transformers engine) processes that batch requests, each with cores/N threads, over one "
                        "shared copy of the weights; auto: 2 for small weights on a multi-core CPU, else 1")
    p.set_defaults(func=verbs.serve)
    p = sub.add_parser("serve-adapters", help="(the vLLM pod's sidecar) keep vLLM serving the adapters a list names, "
                                              "loading and unloading them at runtime")
    p.add_argument("--file", required=True, help="the list: {\"adapters\": [{\"name\": ..., \"uri\": ...}]} "
                                                 "(the mounted ConfigMap)")
    p.add_argument("--vllm", default="http://127.0.0.1:8000", help="the vLLM server in this pod")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between passes")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.set_defaults(func=verbs.serve_adapters)
    p = sub.add_parser("chat", help="chat with a served model (URL) or a run: one-shot, or interactive without MESSAGE")
    p.add_argument("target", metavar="URL|RUN", help="http(s)://host:port of an OpenAI-compatible server, or a run folder")
    p.add_argument("messages", nargs="*", help="one-shot questions (each answered separately)")
    p.add_argument("--base", action="store_true", help="answer with the base model instead of the tuned one (RUN)")
    p.add_argument("--compare", action="store_true", help="print base and tuned answers side by side (RUN)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--model", help="model name on the server (default: the first in /v1/models)")
    p.add_argument("--api-key", help="API key for the server (default: KUBETUNE_API_KEY or OPENAI_API_KEY)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(func=verbs.chat)
    _server_parser(sub, verbs)
    return parser


def _server_parser(sub: argparse._SubParsersAction, verbs: object) -> None:  # type: ignore[type-arg]
    def home_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--home", default=".kubetune-server",
                       help="the server's folder: its SQLite database, job logs, and (without --storage) files and runs")
        p.add_argument("--database", help="postgresql://USER@HOST:PORT/DB shared by several replicas (password in "
                                          "PGPASSWORD); default SQLite in --home")

    p = sub.add_parser("server", help="the control plane: OpenAI's fine-tuning API and a dashboard over every run",
                       description="OpenAI-compatible fine-tuning API (/v1/files, /v1/fine_tuning/jobs, /v1/models, "
                                   "/v1/chat/completions) that runs jobs as `kubetune train` processes")
    home_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="listen address; beyond loopback an API key is required")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--storage", help="where uploaded files and runs go: a folder or s3://bucket/prefix "
                                     "(default: --home)")
    p.add_argument("--api-key", dest="api_keys", action="append", default=[],
                   help="accept this key (Bearer), stored hashed; repeatable; also KUBETUNE_API_KEY")
    p.add_argument("--backend", choices=["local", "kubernetes"], default="local",
                   help="local: jobs run as kubetune train processes here; kubernetes: as Jobs (kubetune submit), "
                        "with --storage in a bucket")
    p.add_argument("--namespace", default="default", help="(kubernetes) the namespace of the jobs, unless a job's "
                                                          "kubetune.kubernetes.namespace says otherwise")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="the operator's policy (YAML): models tenants may name, limits, per-key budgets, the spec "
                        "settings of every job (tracking, storage, kubernetes), rewards, teams; see the README")
    p.add_argument("--models-root", type=Path, metavar="DIR",
                   help="a folder of model folders: a tenant's `model: NAME` is DIR/NAME")
    p.add_argument("--concurrency", type=int, default=1, help="(local) jobs trained at once on this machine")
    p.add_argument("--max-upload-mb", type=int, default=512, help="largest file accepted by /v1/files")
    p.add_argument("--worker-id", help="this replica's name for the jobs it runs (default: the host name); a "
                                       "server started again with the same name resumes them")
    p.add_argument("--max-concurrency", type=int, default=16, help="chat requests admitted per served engine")
    p.add_argument("--runs", action="append", default=[], metavar="URI",
                   help="a folder or bucket prefix of runs (e.g. runs, s3://bucket/runs) the dashboard also shows; "
                        "repeatable")
    p.add_argument("--cluster", dest="clusters", action="append", default=[], metavar="NAMESPACE",
                   help="the dashboard also shows kubetune's training Jobs in this namespace (kubeconfig or the "
                        "pod's service account); repeatable")
    p.set_defaults(func=verbs.server)  # type: ignore[attr-defined]
    keys = p.add_subparsers(dest="server_command", metavar="COMMAND")
    k = keys.add_parser("key", help="API keys: create (printed once, stored hashed) or list")
    k.add_argument("action", choices=["create", "list"])
    k.add_argument("--name", default="default", help="a label for the key (create)")
    home_flags(k)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "verb", None) == "chat" and not any(e.startswith("-") for e in extra):
        args.messages += extra  # argparse stops positional matching at the first flag: `chat RUN --base "hi"`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KubetuneError as exc:
        if settings.debug() and exc.__cause__ is not None:  # a wrapped failure (training): its traceback too
            import traceback

            traceback.print_exception(exc.__cause__, file=sys.stderr)
        if not _left_for_the_launcher(exc):
            print(exc.render(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - no traceback reaches a user; KUBETUNE_DEBUG=1 shows it
        if settings.debug():
            raise
        text = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: unexpected {type(exc).__name__}: {text}\nhint: this is a kubetune bug, not your input; rerun "
              f"with {settings.DEBUG}=1 for the traceback and report it", file=sys.stderr)
        return EXIT_FAILURE


def _left_for_the_launcher(exc: KubetuneError) -> bool:
    """A torchrun rank leaves its reason beside its exit code for the launcher, which says the most
    telling one once: which rank torchrun lets finish printing is a race (the first rank to fail gets
    the others killed), so no rank prints its own."""
    folder = os.environ.get(settings.RANK_EXITS)
    if "LOCAL_RANK" not in os.environ or not folder:
        return False
    _leave(folder, exc.exit_code, exc.render())
    return True


def _leave(folder: str, code: int, message: str | None) -> None:
    path = Path(folder, f"rank-{os.environ.get('RANK', '0')}")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"code": code, "message": message}))
    os.replace(tmp, path)  # the launcher never reads half a reason


def run() -> None:
    code = main()
    if "LOCAL_RANK" in os.environ:
        folder = os.environ.get(settings.RANK_EXITS)
        if folder and code and not Path(folder, f"rank-{os.environ.get('RANK', '0')}").exists():
            _leave(folder, code, None)  # torchrun itself exits 1 for any failed rank: the launcher reads what it meant
        # A torchrun rank whose work is finished (files written and closed, process group destroyed).
        # Interpreter teardown of torch.distributed state sometimes aborts ("terminate called without
        # an active exception", SIGABRT; seen ~1 in 10 two-rank CPU runs), turning a finished run
        # into a failed one: leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
