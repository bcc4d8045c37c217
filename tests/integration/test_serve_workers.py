"""`kubetune serve --workers 2`: the lanes batch in two worker processes over the server's weights
(serve.workers). Same answers as in-process batching, admission and metrics unchanged, a dead worker
makes the server unhealthy instead of hanging its requests, and no worker outlives its server."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import psutil
import pytest

from tests.integration.test_serve import adapter_run, burst, gauges, start_server, stop  # noqa: F401 - adapter_run: the module's run fixture

pytestmark = pytest.mark.integration

QUESTIONS = [f"Describe a {c} {a}." for c in ("blue", "green", "red", "grey") for a in ("fox", "owl", "cat", "dog")]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # same intra-op threads in and out of workers: same sums, same answers


def workers_of(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    """The server's engine workers (multiprocessing's spawned children, not its resource tracker)."""
    return [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]


def answers(url: str, model: str, **extra: object) -> list[tuple[str, int, str]]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    def ask(q: str) -> tuple[str, int, str]:
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                max_tokens=40, stream=True, stream_options={"include_usage": True},
                                                **extra)  # type: ignore[arg-type]
        text, tokens, reason = "", 0, ""
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, tokens, reason

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(ask, QUESTIONS))


def test_two_workers_answer_as_one_process_does(adapter_run: Path) -> None:  # noqa: F811
    """Greedy, seeded-sampled and stop-string answers of the run and its base, 16 concurrent streams:
    identical with the lanes in two workers and in the server itself."""
    runs = {}
    for workers in ("1", "2"):
        proc, url = start_server(adapter_run, "--workers", workers, **ONE_THREAD)
        try:
            got = {
                "greedy": answers(url, "served", temperature=0),
                "base": answers(url, "tiny-llama", temperature=0),
                "seeded": answers(url, "served", temperature=0.9, top_p=0.9, seed=7),
                "stop": answers(url, "served", temperature=0, stop=["o"]),
            }
            if workers == "2":
                assert len(workers_of(proc)) == 2
        finally:
            out = stop(proc)
        runs[workers] = got
        expected = "2 worker processes of 1 threads" if workers == "2" else "in this process"
        assert expected in out, out
    for kind in ("greedy", "seeded"):
        assert runs["2"][kind] == runs["1"][kind], kind
    # Cut by a stop string: the same text; the tokens counted depend on when the cut reached the batch.
    assert [t for t, _, _ in runs["2"]["stop"]] == [t for t, _, _ in runs["1"]["stop"]]
    # The untrained base's logits are near ties (a random model), so a step's batch neighbours may flip a
    # token; what matters here is that the second lane of each worker answers.
    assert all(text and tokens > 0 for text, tokens, _ in runs["2"]["base"])
    assert all(text and tokens > 0 for text, tokens, _ in runs["2"]["greedy"])
    assert all("o" not in text and reason == "stop" for text, _, reason in runs["2"]["stop"])


def test_workers_keep_admission_and_metrics_and_leave_with_the_server(adapter_run: Path) -> None:  # noqa: F811
    """Above --max-concurrency: only 200s and 429s; a stream dropped early frees its place (and its row
    in a worker's batch); the gauges come back to zero; SIGTERM to the server ends its workers too."""
    proc, url = start_server(adapter_run, "--workers", "2", "--max-concurrency", "4")
    children = workers_of(proc)
    assert len(children) == 2

    try:
        results = burst(url, "served")
        codes = [a.status for a in results]
        assert set(codes) == {200, 429}, codes
        # the workers' tokens reach the server's counters (not `> 0`: on some CPUs the tiny adapter's greedy
        # answer to these prompts is the end of turn at once; the usage the answers report is the truth)
        tokens = 'vllm:generation_tokens_total{model_name="served"}'
        before = gauges(url)
        assert before[tokens] == sum(a.completion_tokens for a in results)
        assert before['vllm:prompt_tokens_total{model_name="served"}'] > 0
        body = {"model": "served", "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 900,
                "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body) as res:
            lines = res.iter_lines()
            assert [next(lines) for _ in range(6)]
        deadline = time.time() + 5
        while gauges(url)["kubetune_requests_running"] != 0 and time.time() < deadline:
            time.sleep(0.05)
        samples = gauges(url)
        assert samples["kubetune_requests_running"] == 0 and samples["kubetune_requests_waiting"] == 0
        assert samples["vllm:num_requests_running"] == 0
        assert samples[tokens] >= before[tokens] + 2  # the abandoned stream's tokens count too
        assert samples["kubetune_requests_rejected_total"] == codes.count(429)
        again = [a.status for a in burst(url, "served")]
        assert sum(code == 200 for code in again) >= 4 and set(again) <= {200, 429}
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    finally:
        stop(proc)
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"workers outlived the server: {alive}"


def test_a_dead_worker_fails_its_requests_and_the_health_check(adapter_run: Path) -> None:  # noqa: F811
    """Streams in flight on a worker that is killed end with an error (none hangs); /health turns 503
    naming the worker; new requests get 503 engine_failed; the server stays up to say so."""
    import threading

    proc, url = start_server(adapter_run, "--workers", "2")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    started = threading.Semaphore(0)

    def stream(i: int) -> str:
        chunks = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": f"Go on {i}."}],
                                                max_tokens=900, temperature=0, stream=True)
        try:
            for n, _ in enumerate(chunks):
                if n == 2:
                    started.release()
            return "finished"
        except openai.APIError as exc:
            return f"error: {exc}"

    try:
        with ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(stream, i) for i in range(4)]
            for _ in range(4):
                assert started.acquire(timeout=60)
            os.kill(workers_of(proc)[0].pid, signal.SIGKILL)
            ends = [s.result(timeout=60) for s in streams]
        assert any(e.startswith("error:") and "engine worker" in e for e in ends), ends
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503, health.text
        assert "engine worker" in health.text and "exited (killed by SIGKILL)" in health.text
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="served", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        assert err.value.status_code == 503 and "engine" in str(err.value.body)
        assert proc.poll() is None  # the server stays up to say why; its liveness probe restarts it
    finally:
        stop(proc)


def test_unmerged_adapters_on_shared_weights_in_workers(adapter_run: Path, tmp_path: Path) -> None:  # noqa: F811
    """Two adapter runs of one base, LoRA unmerged on the base's tensors, in two workers: the workers map
    the server's weights (shared memory), and each adapter answers as it does merged in one process."""
    import shutil

    import yaml

    twin = tmp_path / "twin"
    shutil.copytree(adapter_run, twin)
    spec = yaml.safe_load((twin / "spec.yaml").read_text())
    spec["name"] = "twin"
    (twin / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc, url = start_server([adapter_run, twin], "--adapters", "unmerged", "--workers", "2", **ONE_THREAD)
    try:
        shared = [[m for m in w.memory_maps(grouped=False) if "/torch_" in m.path] for w in workers_of(proc)]
        assert len(shared) == 2 and all(shared), "the workers do not map the server's weights"
        served, twin_answers = answers(url, "served", temperature=0), answers(url, "twin", temperature=0)
    finally:
        out = stop(proc)
    assert "served: LoRA unmerged, on the shared base weights" in out
    proc, url = start_server(adapter_run, "--workers", "1", **ONE_THREAD)
    try:
        merged = answers(url, "served", temperature=0)
    finally:
        stop(proc)
    assert served == twin_answers == merged
