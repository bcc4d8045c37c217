"""`kubetune serve` on a trained adapter run (no merge), driven by the official `openai` client
and raw HTTP: models, chat, streaming, completions, concurrency, errors, auth, metrics, template
parity with training, and `kubetune chat` against the URL."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple

import httpx2 as httpx  # the HTTP client openai itself uses
import openai
import pytest
import yaml

from kubetune.data.template import IGNORE, ChatFormatter
from tests.conftest import QUICKSTART_DATA, kubetune_cmd, quiet_env, run_kubetune

pytestmark = pytest.mark.integration

QUESTION = "Describe a blue fox."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    tmp = tmp_path_factory.mktemp("serve")
    spec = {
        "name": "served", "model": {"base": str(tiny_model)},
        "data": {"train": str(QUICKSTART_DATA / "train.jsonl"), "max_length": 128},
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32}},
        "train": {"max_steps": 250, "total_batch_size": 16, "max_per_device_batch_size": 16,
                  "save_every_steps": 250, "logging_steps": 50, "learning_rate": 3e-3},
        "output": str(tmp / "runs" / "served"), "resources": {"accelerator": "cpu"},
    }
    path = tmp / "served.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = run_kubetune("train", str(path), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp / "runs" / "served"
    assert not (run / "final" / "merged").exists()  # served straight from the adapter
    return run


def start_server(run: Path | list[Path], *flags: str, **env: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    runs = [str(r) for r in (run if isinstance(run, list) else [run])]
    proc = subprocess.Popen(kubetune_cmd("serve", *runs, "--port", str(port), *flags), env=quiet_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not become healthy in 120 s")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


@pytest.fixture(scope="module")
def server(adapter_run: Path) -> Iterator[str]:
    proc, url = start_server(adapter_run)
    yield url
    stop(proc)


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_run_and_its_base(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["served", "tiny-llama"]


def test_chat_stream_and_plain_give_the_same_text_and_stop_at_end_of_turn(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": QUESTION}]
    plain = client.chat.completions.create(model="served", messages=msgs, temperature=0, max_tokens=64)
    text = plain.choices[0].message.content
    assert text and "<|im_end|>" not in text
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 64
    streamed = client.chat.completions.create(model="served", messages=msgs, temperature=0, max_tokens=64, stream=True,
                                              stream_options={"include_usage": True})
    parts, reasons, usage = [], [], None
    for chunk in streamed:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(parts) == text
    assert len([p for p in parts if p]) > 1  # really streamed, not one blob
    assert reasons[-1] == "stop" and usage is not None and usage.completion_tokens == plain.usage.completion_tokens


def test_base_model_answers_differently(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": QUESTION}]
    base = client.chat.completions.create(model="tiny-llama", messages=msgs, temperature=0, max_tokens=16)
    tuned = client.chat.completions.create(model="served", messages=msgs, temperature=0, max_tokens=16)
    assert base.choices[0].message.content != tuned.choices[0].message.content


def test_completions_and_stop_strings(client: openai.OpenAI) -> None:
    res = client.completions.create(model="served", prompt="A blue fox", max_tokens=8, temperature=0)
    assert res.usage.completion_tokens <= 8 and res.choices[0].finish_reason in {"stop", "length"}
    msgs = [{"role": "user", "content": QUESTION}]
    full = client.chat.completions.create(model="served", messages=msgs, temperature=0, max_tokens=64)
    text = full.choices[0].message.content or ""
    word = text.split()[1]  # stop at the second word: the answer is cut just before it
    cut = client.chat.completions.create(model="served", messages=msgs, temperature=0, max_tokens=64, stop=[word])
    assert cut.choices[0].message.content == text[:text.index(word)] and cut.choices[0].finish_reason == "stop"


def test_32_concurrent_clients_all_get_answers(client: openai.OpenAI) -> None:
    questions = [f"What is {i} + {i + 1}?" for i in range(32)]

    def ask(q: str) -> str:
        res = client.chat.completions.create(model="served", messages=[{"role": "user", "content": q}],
                                             temperature=0, max_tokens=32)
        return res.choices[0].message.content or ""

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, questions))
    assert len(answers) == 32 and all(answers)


def test_batched_answers_equal_generate_with_the_adapter_on_the_base(client: openai.OpenAI, adapter_run: Path,
                                                                  tiny_model: Path) -> None:
    """16 requests in one continuous batch (adapter merged in memory) answer exactly what transformers'
    `generate` answers one at a time with the unmerged adapter on the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    questions = [f"Describe a {c} {a}." for c in ("blue", "green", "red", "grey") for a in ("fox", "owl", "cat", "dog")]

    def ask(q: str) -> tuple[str, int]:
        res = client.chat.completions.create(model="served", messages=[{"role": "user", "content": q}],
                                             temperature=0, max_tokens=40)
        return res.choices[0].message.content or "", res.usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        served = list(pool.map(ask, questions))
    adapter = adapter_run / "final" / "adapter"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                      adapter).eval()
    formatter, gen = ChatFormatter(adapter), GenerationConfig.from_pretrained(adapter)
    for q, (text, count) in zip(questions, served):
        ids = formatter.encode_prompt([{"role": "user", "content": q}], None, True, "")
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                                 eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id)[0, len(ids):].tolist()
        ended = out[-1] in (gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
        assert text == formatter.tokenizer.decode(out, skip_special_tokens=True), q
        assert count == len(out) - int(ended)


def test_temperature_top_p_and_seed_are_per_request(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": QUESTION}]

    def ask(temperature: float, seed: int | None = None, top_p: float = 1.0) -> str:
        res = client.chat.completions.create(model="tiny-llama", messages=msgs, temperature=temperature,
                                             top_p=top_p, seed=seed, max_tokens=24)
        return res.choices[0].message.content or ""

    alone = ask(1.0, seed=7)
    jobs = [(0.0, None, 1.0)] * 6 + [(1.0, None, 1.0)] * 6 + [(1.0, 7, 1.0)] + [(1.0, 8, 1.0)]
    with ThreadPoolExecutor(len(jobs)) as pool:  # one batch: greedy, sampled and seeded rows together
        answers = list(pool.map(lambda job: ask(*job), jobs))
    greedy, sampled, seven, eight = answers[:6], answers[6:12], answers[12], answers[13]
    assert seven == alone  # the seed decides, not what else was in the batch
    assert eight != seven and len(set(sampled)) > 1
    assert len(set(greedy)) == 1 and greedy[0] == ask(0.0)
    assert ask(1.0, top_p=1e-6) == greedy[0]  # a nucleus of one token is the argmax


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (json.dumps({"model": "served"}).encode(), 400, "messages"),
    (json.dumps({"model": "served", "messages": [{"role": "bot", "content": "x"}]}).encode(), 400, "messages[0]"),
    (json.dumps({"model": "served", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(),
     400, "max_tokens"),
    (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model"),
    (json.dumps({"model": "served", "messages": [{"role": "user", "content": "x"}], "seed": 2**64 + 3}).encode(),
     400, "seed"),  # a 500 once: the sampler's generator takes 64 bits
    (json.dumps({"model": "served", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 17}).encode(),
     400, "stop"),  # each is searched for at every step: bounded
    (json.dumps({"model": "served", "messages": [{"role": "user", "content": "x"}], "stop": "z" * 1001}).encode(),
     400, "stop"),
    # not returned by this engine: refused by field, not answered without them
    (json.dumps({"model": "served", "messages": [{"role": "user", "content": "x"}], "logprobs": True}).encode(),
     400, "logprobs"),
    (json.dumps({"model": "served", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}).encode(),
     400, "top_logprobs"),
])
def test_bad_requests_get_openai_style_errors(server: str, body: bytes, status: int, param: str | None) -> None:
    res = httpx.post(f"{server}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert res.status_code == status
    err = res.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_openai_client_sees_a_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="served", messages=[{"role": "user", "content": "x " * 5000}])
    assert info.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


def test_template_parity_with_training(server: str, tiny_model: Path) -> None:
    """The server renders the same token ids as training did, and the answer starts where training's loss did."""
    formatter = ChatFormatter(tiny_model, "auto")
    rows = [json.loads(line) for line in (QUICKSTART_DATA / "train.jsonl").read_text().splitlines()[:20]]
    rows.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2 + 2?"},
                              {"role": "assistant", "content": "4"}]})
    for row in rows:
        messages = row["messages"]
        ids, labels = formatter.encode_chat(messages)
        full = httpx.post(f"{server}/tokenize", json={"model": "served", "messages": messages,
                                                      "add_generation_prompt": False}).json()["tokens"]
        assert full == ids
        prompt = httpx.post(f"{server}/tokenize", json={"model": "served", "messages": messages[:-1]}).json()["tokens"]
        first_trained = next(i for i in range(len(labels) - 1, -1, -1)
                             if labels[i] != IGNORE and (i == 0 or labels[i - 1] == IGNORE))
        assert ids[:len(prompt)] == prompt and first_trained == len(prompt)


def test_metrics_count_requests_and_tokens(server: str, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="served", messages=[{"role": "user", "content": QUESTION}], max_tokens=8)
    text = httpx.get(f"{server}/metrics").text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['kubetune_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert samples['kubetune_generation_tokens_total{model="served"}'] > 0
    assert samples["kubetune_requests_waiting"] == 0
    assert samples['kubetune_request_latency_seconds_count{model="served"}'] >= 1
    assert samples['kubetune_time_to_first_token_seconds_count{model="served"}'] >= 1
    # the same measures under vLLM's names, which `kubetune deploy`'s HPA and vLLM dashboards read
    assert samples["vllm:num_requests_waiting"] == 0 and samples["vllm:num_requests_running"] == 0
    assert samples['vllm:generation_tokens_total{model_name="served"}'] == \
        samples['kubetune_generation_tokens_total{model="served"}']
    assert samples['vllm:time_to_first_token_seconds_count{model_name="served"}'] >= 1


def test_api_key_and_a_full_queue(adapter_run: Path) -> None:
    proc, url = start_server(adapter_run, "--max-concurrency", "1", KUBETUNE_API_KEY="s3cret-key")
    try:
        denied = httpx.get(f"{url}/v1/models")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret-key", max_retries=0)
        assert [m.id for m in client.models.list()][0] == "served"

        # the base model does not stop early: each request holds the only slot for a while
        def ask(_: int) -> int:
            try:
                client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}],
                                               max_tokens=120, temperature=0)
                return 200
            except openai.RateLimitError as exc:
                assert exc.body["type"] == "rate_limit_error"  # type: ignore[index]
                return 429

        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(ask, range(6)))
        assert 200 in codes and 429 in codes
        assert client.models.list()  # still alive after refusing
    finally:
        out = stop(proc)
    assert "s3cret-key" not in out


class Answer(NamedTuple):
    status: int
    retry_after: str | None
    completion_tokens: int  # from the answer's usage; 0 unless it is a 200


def burst(url: str, model: str, n: int = 24) -> list[Answer]:
    """`n` chat requests at once (every other one streamed, with usage in its last chunk)."""
    import asyncio

    async def one(http: httpx.AsyncClient, i: int) -> Answer:
        body = {"model": model, "messages": [{"role": "user", "content": f"Count to {i}."}],
                "max_tokens": 48, "temperature": 0, "stream": i % 2 == 0}
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
        res = await http.post(f"{url}/v1/chat/completions", json=body)
        tokens = 0
        if res.status_code == 200:
            chunks = [json.loads(line[6:]) for line in res.text.splitlines() if line.startswith("data: {")]
            usage = [c["usage"] for c in chunks if c.get("usage")] if body["stream"] else [res.json()["usage"]]
            tokens = usage[-1]["completion_tokens"]
        return Answer(res.status_code, res.headers.get("retry-after"), tokens)

    async def load() -> list[Answer]:
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(http, i) for i in range(n)))

    return asyncio.run(load())


def gauges(url: str) -> dict[str, float]:
    """The server's /metrics samples by series (name and labels)."""
    text = httpx.get(f"{url}/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_more_clients_than_admitted_get_200_or_429_and_a_client_that_leaves_frees_its_place(adapter_run: Path) -> None:
    """A load test above --max-concurrency: every answer is a 200 or a 429 with Retry-After, never a 5xx;
    the gauges come back to zero, and a stream dropped after two chunks gives its slot back at once."""
    proc, url = start_server(adapter_run, "--max-concurrency", "4")

    try:
        results = burst(url, "tiny-llama")
        codes = [a.status for a in results]
        assert set(codes) == {200, 429}, codes
        assert all(a.retry_after == "1" for a in results if a.status == 429)
        samples = gauges(url)
        assert samples["kubetune_requests_rejected_total"] == codes.count(429)
        # counted as the answers' usage says, whatever the tiny model's answers are on this CPU
        assert samples['vllm:generation_tokens_total{model_name="tiny-llama"}'] == sum(a.completion_tokens for a in results)
        assert samples["kubetune_requests_running"] == 0 and samples["kubetune_requests_waiting"] == 0
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}

        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 900,
                "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body) as res:
            lines = res.iter_lines()
            assert [next(lines) for _ in range(6)]  # the client reads a little, then goes away
        deadline = time.time() + 5
        while gauges(url)["kubetune_requests_running"] != 0 and time.time() < deadline:
            time.sleep(0.05)
        after = gauges(url)
        assert after["kubetune_requests_running"] == 0
        # the abandoned answer's tokens count, as vLLM counts them (at each step): at least the ones read
        tokens = 'vllm:generation_tokens_total{model_name="tiny-llama"}'
        assert after[tokens] >= samples[tokens] + 2
        again = burst(url, "tiny-llama")  # all four places are free again
        assert sum(a.status == 200 for a in again) >= 4 and {a.status for a in again} <= {200, 429}
    finally:
        stop(proc)


def test_chat_cli_one_shot_and_interactive_against_the_url(server: str, client: openai.OpenAI) -> None:
    expected = client.chat.completions.create(model="served", messages=[{"role": "user", "content": QUESTION}],
                                              temperature=0, max_tokens=128).choices[0].message.content
    res = run_kubetune("chat", server, QUESTION)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == expected
    res = subprocess.run(kubetune_cmd("chat", server, "--model", "served"), input=f"{QUESTION}\nWhat is 2 + 3?\n",
                         capture_output=True, text=True, env=quiet_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == expected and len(lines) == 2 and lines[1]


def test_chat_cli_errors_name_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    res = run_kubetune("chat", url, "hi")
    assert res.returncode == 2 and f"cannot reach {url}" in res.stderr and "Traceback" not in res.stderr


def test_two_adapter_runs_share_one_base_unmerged(adapter_run: Path, tmp_path: Path, client: openai.OpenAI) -> None:
    """Two adapter runs of one base, LoRA unmerged on the base's shared weights (one copy of the base):
    each batches in its own lane and answers what the merged-in-memory server answers."""
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(adapter_run, twin)
    spec = yaml.safe_load((twin / "spec.yaml").read_text())
    spec["name"] = "twin"
    (twin / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc, url = start_server([adapter_run, twin], "--adapters", "unmerged")
    try:
        unmerged = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert [m.id for m in unmerged.models.list()] == ["served", "twin", "tiny-llama"]
        msgs = [{"role": "user", "content": QUESTION}]
        with ThreadPoolExecutor(3) as pool:
            a, b, base = pool.map(lambda m: unmerged.chat.completions.create(
                model=m, messages=msgs, temperature=0, max_tokens=32).choices[0].message.content,
                ["served", "twin", "tiny-llama"])
        merged = client.chat.completions.create(model="served", messages=msgs, temperature=0, max_tokens=32)
        assert a == b == merged.choices[0].message.content and a  # same adapter weights, merged or not
        assert base != a
    finally:
        out = stop(proc)
    assert "served: LoRA unmerged, on the shared base weights" in out and "tiny-llama: base weights" in out


def test_chat_with_a_run_interactively_in_process(adapter_run: Path) -> None:
    res = subprocess.run(kubetune_cmd("chat", str(adapter_run)), input=f"{QUESTION}\n\n", capture_output=True,
                         text=True, env=quiet_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip().splitlines()) == 1 and res.stdout.strip()


def test_a_kubetune_serve_model_as_the_judge_of_model_graders(server: str, client: openai.OpenAI) -> None:
    """`kubetune serve` as the operator's judge endpoint: it takes the graders' requests (response_format and
    all) and answers; a tiny random model answers no score, which grades as OpenAI's parse error, not a crash."""
    from kubetune.graders import grade, parse_grader
    from kubetune.graders.judge import Endpoints
    from kubetune.spec.models import JudgeSpec

    name = client.models.list().data[0].id
    endpoints = Endpoints({"judge": JudgeSpec(base_url=f"{server}/v1", model=name, max_tokens=8, timeout_s=60)},
                          retries=0)
    grader = parse_grader({"type": "score_model", "name": "j", "model": "judge", "sampling_params": {"temperature": 0},
                           "input": [{"role": "user", "content": "Score 0 to 1: {{sample.output_text}}"}]})
    graded = grade(grader, "Paris", {}, endpoints=endpoints)
    assert not graded.errors["model_grader_server_error"], graded.details  # it was asked and it answered
    assert graded.tokens["judge"]["completion_tokens"] <= 8  # the operator's token cap
    assert graded.errors["model_grader_parse_error"] or 0.0 <= graded.reward <= 1.0
    if graded.errors["model_grader_parse_error"]:
        assert "not a score" in (graded.details or "")


def test_n_choices_each_a_request_of_the_batch(client: openai.OpenAI) -> None:
    """`n` answers to one prompt: indices 0..n-1, the prompt counted once in usage and each choice's
    tokens added up, sampled choices seeded apart. (Not compared token for token with lone requests:
    rows batched together may round differently, and a sampled token can follow.)"""
    msgs = [{"role": "user", "content": "Describe a blue fox."}]
    sampled = client.chat.completions.create(model="served", messages=msgs, n=3, temperature=1.0, seed=5,
                                             max_tokens=12)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert len({c.message.content for c in sampled.choices}) > 1  # seed, seed + 1, seed + 2
    one = client.chat.completions.create(model="served", messages=msgs, temperature=1.0, seed=5, max_tokens=12)
    assert sampled.usage.prompt_tokens == one.usage.prompt_tokens
    assert 3 <= sampled.usage.completion_tokens <= 36
    assert sampled.usage.total_tokens == sampled.usage.prompt_tokens + sampled.usage.completion_tokens
    text = client.completions.create(model="served", prompt="The fox", n=2, temperature=1.0, seed=1, max_tokens=6)
    assert [c.index for c in text.choices] == [0, 1] and all(c.finish_reason for c in text.choices)
    for bad in ({"n": 2, "stream": True}, {"n": 9}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="served", messages=msgs, max_tokens=4, **bad)
        assert info.value.body["param"] == "n"  # type: ignore[index]
