"""Serving throughput: `transformers serve --continuous-batching` vs `kubetune serve`, side by side.

    python bench/serve_throughput.py [--clients 32] [--requests 256] [--max-tokens 48] [--models quickstart,bench]

For each model (the quickstart's tiny Llama and the ~21M Llama of train_throughput.py), one LoRA
adapter run is trained with `kubetune train` (a few steps; the adapter stays unmerged on disk).
The library's server gets the merged folder (it cannot load an adapter); kubetune serves the run
folder itself. Both get the same prompts from the same N concurrent clients (the official
`openai` client, streaming, temperature 0); every answer must be identical on both sides. Printed
per side: req/s, generated tokens/s, p50/p95 latency and time to first token (client-side); the
last line is kubetune's req/s over the library's, per model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
sys.path.insert(0, str(HERE))
BIN = Path(sys.executable).parent

COLOURS = "red green blue yellow black white grey brown orange purple".split()
ANIMALS = "fox owl cat dog horse bear wolf deer frog hare".split()


@dataclass
class Side:
    name: str
    rps: float
    tokens_per_s: float
    p50: float
    p95: float
    ttft50: float
    ttft95: float
    answers: list[str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "KUBETUNE_PROGRESS": "0"}


def train_adapter(model: Path, data: Path, name: str, steps: int, max_length: int) -> Path:
    """An adapter run of `model` (cached in bench/.cache/runs/NAME)."""
    import yaml

    run = CACHE / "runs" / name
    if (run / "final" / "adapter" / "adapter_config.json").exists():
        return run
    shutil.rmtree(run, ignore_errors=True)
    spec = {"name": name, "model": {"base": str(model)},
            "data": {"train": str(data), "max_length": max_length},
            "method": {"type": "lora", "lora": {"r": 16, "alpha": 32}},
            "train": {"max_steps": steps, "total_batch_size": 8, "save_every_steps": steps, "logging_steps": steps,
                      "learning_rate": 3e-3},
            "output": str(run), "resources": {"accelerator": "cpu"}}
    path = CACHE / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    subprocess.run([str(BIN / "kubetune"), "train", str(path)], check=True, env=env(), stdout=subprocess.DEVNULL)
    return run


def merged_copy(run: Path) -> Path:
    """The run merged into a folder of its own (the library's server cannot load an adapter)."""
    copy = run.with_name(run.name + "-merged")
    if not (copy / "final" / "merged" / "config.json").exists():
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy)
        subprocess.run([str(BIN / "kubetune"), "merge", str(copy)], check=True, env=env(), stdout=subprocess.DEVNULL)
    return copy / "final" / "merged"


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not become healthy")


async def load(url: str, model: str | list[str], prompts: list[str], clients: int, max_tokens: int) -> tuple[float, list]:
    """`clients` concurrent streams over the prompts (request i asks model i mod len(models)); per request
    (latency, ttft, answer)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    models = [model] if isinstance(model, str) else model
    results: list = [None] * len(prompts)
    todo = iter(range(len(prompts)))

    async def one(i: int) -> None:
        began = time.perf_counter()
        first = None
        parts = []
        stream = await client.chat.completions.create(
            model=models[i % len(models)], messages=[{"role": "user", "content": prompts[i]}], temperature=0, max_tokens=max_tokens,
            stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                parts.append(chunk.choices[0].delta.content)
        end = time.perf_counter()
        results[i] = (end - began, (first or end) - began, "".join(parts))

    async def worker() -> None:
        for i in todo:
            await one(i)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - began
    await client.close()
    return elapsed, results


def measure(label: str, cmd: list[str], model: str | list[str], prompts: list[str], clients: int, max_tokens: int,
            tokenizer) -> Side:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(proc, url)
        asyncio.run(load(url, model, prompts[:clients], clients, max_tokens))  # warm-up: caches, lazy init
        elapsed, results = asyncio.run(load(url, model, prompts, clients, max_tokens))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    latencies = sorted(r[0] for r in results)
    ttfts = sorted(r[1] for r in results)
    answers = [r[2] for r in results]
    tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return Side(label, len(prompts) / elapsed, tokens / elapsed, statistics.median(latencies), pct(latencies, 0.95),
                statistics.median(ttfts), pct(ttfts, 0.95), answers)


def assets(which: str) -> tuple[Path, Path, int, int]:
    """(base model, chat data, train steps, max_length) of one bench model."""
    if which == "quickstart":
        from kubetune.quickstart.assets import build_model

        model = CACHE / "quickstart-model"
        if not (model / "config.json").exists():
            build_model(model)
        return model, ROOT / "examples" / "data" / "quickstart" / "train.jsonl", 60, 128
    from train_throughput import build_assets

    model, data = build_assets(320, 512, 6)
    return model, data, 10, 256


def two_adapters(run: Path, model: Path, data: Path, steps: int, max_length: int, single: Side, prompts: list[str],
                 args: argparse.Namespace, tokenizer) -> None:
    """Two adapter runs of one base in one server, requests alternating between them: each adapter
    batches in its own lane (transformers packs a batch into one row, so adapters cannot share one);
    merged copies vs LoRA unmerged on the shared base weights."""
    other = train_adapter(model, data, "serve-quickstart-b", steps // 2, max_length)
    names = [run.name, other.name]
    print(f"\ntwo adapter runs of {model.name} in one server, requests alternating between {names}:")
    print("| adapters | req/s | gen tok/s | p50 latency | p50 TTFT | vs one adapter |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    answers = {}
    for mode in ("merged", "unmerged"):
        side = measure(mode, [str(BIN / "kubetune"), "serve", str(run), str(other), "--no-base", "--adapters", mode],
                       names, prompts, args.clients, args.max_tokens, tokenizer)
        answers[mode] = side.answers
        print(f"| {mode} | {side.rps:.1f} | {side.tokens_per_s:.0f} | {side.p50:.2f} s | {side.ttft50:.2f} s | "
              f"{side.rps / single.rps:.2f}x |")
    same = sum(a == b for a, b in zip(answers["merged"], answers["unmerged"]))
    print(f"merged and unmerged answers identical: {same}/{len(prompts)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--models", default="quickstart,bench")
    ap.add_argument("--no-adapters", dest="adapters", action="store_false",
                    help="skip the two-adapter measurement (quickstart model: merged vs unmerged lanes)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    CACHE.mkdir(exist_ok=True)
    prompts = [f"Describe a {c} {a}." if k % 2 else f"What colour is the {c} {a}?"
               for k in range(2) for c in COLOURS for a in ANIMALS]
    prompts = (prompts * (args.requests // len(prompts) + 1))[:args.requests]
    ratios = []
    for which in args.models.split(","):
        model, data, steps, max_length = assets(which)
        run = train_adapter(model, data, f"serve-{which}", steps, max_length)
        merged = merged_copy(run)
        tokenizer = AutoTokenizer.from_pretrained(merged)
        print(f"\n## {which} model ({model.name}), adapter run {run} (unmerged), {args.clients} clients, "
              f"{args.requests} requests, max_tokens {args.max_tokens}, temperature 0", flush=True)
        library = measure("transformers serve --continuous-batching",
                          [str(BIN / "transformers"), "serve", str(merged), "--continuous-batching"],
                          str(merged), prompts, args.clients, args.max_tokens, tokenizer)
        ours = measure("kubetune serve", [str(BIN / "kubetune"), "serve", str(run), "--no-base"],
                       run.name, prompts, args.clients, args.max_tokens, tokenizer)
        print("| server | req/s | gen tok/s | p50 latency | p95 latency | p50 TTFT | p95 TTFT |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for side in (library, ours):
            print(f"| {side.name} | {side.rps:.1f} | {side.tokens_per_s:.0f} | {side.p50:.2f} s | {side.p95:.2f} s | "
                  f"{side.ttft50:.2f} s | {side.ttft95:.2f} s |")
        same = sum(a == b for a, b in zip(library.answers, ours.answers))
        print(f"identical answers: {same}/{len(prompts)}")
        if same != len(prompts):
            diff = next(i for i, (a, b) in enumerate(zip(library.answers, ours.answers)) if a != b)
            print(f"  first difference, prompt {prompts[diff]!r}:\n  library: {library.answers[diff]!r}\n"
                  f"  kubetune: {ours.answers[diff]!r}")
        ratios.append((which, ours.rps / library.rps, same == len(prompts)))
        if which == "quickstart" and args.adapters:
            two_adapters(run, model, data, steps, max_length, ours, prompts, args, tokenizer)
    print("\n" + "; ".join(f"{w}: kubetune/library req/s = {r:.2f}x{'' if ok else ' (ANSWERS DIFFER)'}"
                           for w, r, ok in ratios) + "; target >= 1.2x: "
          + ("met" if all(r >= 1.2 and ok for _, r, ok in ratios) else "NOT met"))


if __name__ == "__main__":
    main()
