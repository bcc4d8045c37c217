"""`kubetune serve`: pick an engine, load the run(s), listen. vLLM when asked for (or, with
engine auto, when it is installed and a CUDA GPU is present); otherwise the embedded
transformers engine behind kubetune's own OpenAI-compatible app."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kubetune import settings
from kubetune.cpus import fit_torch_threads
from kubetune.errors import UsageError
from kubetune.serve.vllm import VllmTarget, adapter_rank, vllm_command
from kubetune.uris import hub_ref, uri_basename



@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    engine: str = "auto"               # auto | vllm | transformers
    served_name: str | None = None
    max_concurrency: int = 64
    api_key: str | None = None
    with_base: bool = True
    adapters: str = "auto"             # auto | merged | unmerged (transformers engine)
    workers: int | str = "auto"        # engine processes (transformers engine; serve.workers)
    metrics_auth: str = "open"         # open | key: whether /metrics needs the API key too


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(host: str, api_key: str | None, flag: str = "--api-key KEY (or KUBETUNE_API_KEY)") -> None:
    """Beyond loopback a server answers the network: without a key anyone reaching it could use it."""
    if not api_key and not is_loopback(host):
        raise UsageError(f"--host {host}: the server would answer the network with no API key",
                         f"give {flag}, or listen on 127.0.0.1")


def choose_engine(choice: str) -> str:
    if choice == "transformers":
        return choice
    has_vllm = importlib.util.find_spec("vllm") is not None
    cuda = has_vllm and _cuda_available()
    if choice == "vllm" and not cuda:
        why = "vLLM is not installed" if not has_vllm else "no CUDA GPU is visible"
        raise UsageError(f"serve --engine vllm: {why}", "install vllm on a GPU machine, or use --engine transformers")
    return "vllm" if cuda else "transformers"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def vllm_target(targets: Sequence[str], served_name: str | None = None) -> VllmTarget:
    """What `vllm serve` needs for one run: its merged model, or its base plus the adapter as a LoRA module."""
    from kubetune.runs.run import Run

    if len(targets) != 1:
        raise UsageError("the vLLM engine serves one run per server here", "start one server per run")
    target = targets[0]
    from kubetune.runs.run import is_model_folder, model_folder_name

    if is_model_folder(target):
        return VllmTarget(model=target, served_name=served_name or model_folder_name(target), run_folder=target,
                          tool_parser=_parser_of(Path(target), "auto"), reasoning_parser=_reasoning_of(Path(target)))
    run = Run.open(target)
    final = run.final_model()
    name = served_name or run.name
    parser, reasoning = _parser_of(final.folder, run.spec.serve.tool_parser), _reasoning_of(final.folder)
    if final.merged:
        return VllmTarget(str(final.folder), name, str(final.folder), tool_parser=parser, reasoning_parser=reasoning)
    base, revision = hub_ref(final.base, final.revision)  # vLLM loads a Hub id itself
    return VllmTarget(base, uri_basename(base), str(final.folder), ((name, str(final.folder)),),
                      adapter_rank(final.folder), revision=revision, tool_parser=parser,
                      reasoning_parser=reasoning)


def _parser_of(folder: Path, choice: str) -> str | None:
    """The tool-call parser for a folder's saved chat template (or the spec's explicit choice)."""
    from kubetune.data.tool_calls import format_for
    from kubetune.serve.tool_parser import folder_template

    fmt = format_for(folder_template(folder) if choice == "auto" else None, choice)
    return fmt.parser if fmt else None


def _reasoning_of(folder: Path) -> str | None:
    from kubetune.serve.tool_parser import folder_template, reasoning_parser

    return reasoning_parser(folder_template(folder))


def serve(targets: Sequence[str], options: ServeOptions) -> None:
    api_key = options.api_key or settings.api_key()
    check_listen(options.host, api_key)
    if options.metrics_auth == "key" and not api_key:
        raise UsageError("--metrics-auth key: there is no API key to require", "give --api-key KEY as well")
    if choose_engine(options.engine) == "vllm":
        cmd = vllm_command(vllm_target(targets, options.served_name), options.host, options.port,
                           max_num_seqs=options.max_concurrency)
        env = dict(os.environ)
        if api_key:
            env["VLLM_API_KEY"] = api_key  # by environment: a key on the command line shows in `ps`
        print("starting:", " ".join(cmd), flush=True)
        os.execvpe(cmd[0], cmd, env)
    import uvicorn

    from kubetune.serve.app import ServerSettings, create_app
    from kubetune.serve.engine import load_engine

    threads = fit_torch_threads()  # a pod's CPU limit, not the node's cores
    engine = load_engine(targets, options.served_name, with_base=options.with_base,
                         max_concurrency=options.max_concurrency, adapters=options.adapters,
                         workers=options.workers)
    app = create_app(engine, ServerSettings(max_concurrency=options.max_concurrency, api_key=api_key,
                                            metrics_need_key=options.metrics_auth == "key"))
    url = f"http://{options.host}:{options.port}"
    print(f"serving {', '.join(engine.names)} at {url}/v1 (transformers engine, continuous batching, "
          f"{options.max_concurrency} requests at most, {_workers_line(engine.workers, threads)}"
          f"{', API key required' if api_key else ''})", flush=True)
    for served in engine.served.values():
        print(f"  {served.name}: {served.weights}", flush=True)
    if engine.note:
        print(f"  note: {engine.note}", flush=True)
    print(f"try: kubetune chat {url} \"hello\"", flush=True)
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level="warning", access_log=False)
    except OSError as exc:  # pragma: no cover - uvicorn reports bind errors itself and exits
        print(f"error: cannot listen on {options.host}:{options.port}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _workers_line(workers: int, threads: int) -> str:
    from kubetune.serve.workers import worker_threads

    if workers == 1:
        return f"in this process, {threads} threads"
    return f"{workers} worker processes of {worker_threads(workers, threads)} threads"
