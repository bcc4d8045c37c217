"""The vLLM pod's sidecar (`kubetune serve-adapters`): adapters a list names are fetched from the
bucket and loaded into vLLM at runtime through its LoRA API; ones taken off the list are unloaded.
vLLM is played by an HTTP server that answers /v1/load_lora_adapter and /v1/unload_lora_adapter as
vLLM 0.11 does (400 for an adapter already loaded, 404 for one it does not have) and reads the
adapter folder it is given."""

from __future__ import annotations

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from kubetune.serve.adapter_sync import read_wanted, sync_once
from tests.conftest import kubetune_cmd, quiet_env
from tests.s3_runs import BUCKET
from tests.servers import S3Server

pytestmark = pytest.mark.integration


class FakeVllm:
    def __init__(self, api_key: str | None = None) -> None:
        self.loaded: dict[str, dict[str, Any]] = {}   # name → the adapter_config.json read from its folder
        self.calls: list[tuple[str, dict[str, Any]]] = []
        vllm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, text: str) -> None:
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/v1/models":
                    return self._send(200, json.dumps({"object": "list", "data": [
                        {"id": n, "object": "model", "parent": "tiny"} for n in ["tiny", *vllm.loaded]]}))
                self._send(200 if self.path == "/health" else 404, "")

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                    return self._send(401, '{"error": "Unauthorized"}')
                vllm.calls.append((self.path, body))
                name = body["lora_name"]
                if self.path == "/v1/load_lora_adapter":
                    if name in vllm.loaded:
                        return self._send(400, f"The lora adapter '{name}' has already been loaded.")
                    config = Path(body["lora_path"]) / "adapter_config.json"
                    if not config.exists():
                        return self._send(400, f"No adapter found for {body['lora_path']}")
                    vllm.loaded[name] = json.loads(config.read_text())
                    return self._send(200, f"Success: LoRA adapter '{name}' added successfully.")
                if self.path == "/v1/unload_lora_adapter":
                    if vllm.loaded.pop(name, None) is None:
                        return self._send(404, f"The lora adapter '{name}' cannot be found.")
                    return self._send(200, f"Success: LoRA adapter '{name}' removed successfully.")
                return self._send(404, "")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def vllm() -> Iterator[FakeVllm]:
    server = FakeVllm(api_key="serving-key")
    yield server
    server.stop()


def _adapter(s3: S3Server, name: str, rank: int) -> str:
    client = s3.client()
    client.put_object(Bucket=BUCKET, Key=f"runs/{name}/final/adapter/adapter_config.json",
                      Body=json.dumps({"r": rank, "peft_type": "LORA"}).encode())
    client.put_object(Bucket=BUCKET, Key=f"runs/{name}/final/adapter/adapter_model.safetensors", Body=b"\0" * 64)
    return f"s3://{BUCKET}/runs/{name}/final/adapter"


def _listing(path: Path, adapters: dict[str, str]) -> Path:
    path.write_text(json.dumps({"adapters": [{"name": k, "uri": v} for k, v in adapters.items()]}))
    return path


def test_the_sidecar_loads_listed_adapters_from_the_bucket_and_unloads_the_rest(
        s3: S3Server, vllm: FakeVllm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = _adapter(s3, "job-a", 8), _adapter(s3, "job-b", 16)
    listing = _listing(tmp_path / "adapters.json", {"ft:tiny:a:1": first})
    env = quiet_env(**s3.env(), VLLM_API_KEY="serving-key", KUBETUNE_CACHE=str(tmp_path / "cache"))
    once = subprocess.run(kubetune_cmd("serve-adapters", "--file", str(listing), "--vllm", vllm.url, "--once"),
                          capture_output=True, text=True, env=env, timeout=120)
    assert once.returncode == 0, once.stderr
    assert f"loaded ft:tiny:a:1 from {first}" in once.stdout
    assert vllm.loaded == {"ft:tiny:a:1": {"r": 8, "peft_type": "LORA"}}  # the files it read were the bucket's

    # the next passes, in process: one added, then one taken off; an adapter vLLM already has is kept
    for key, value in {**s3.env(), "KUBETUNE_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    said: list[str] = []
    loaded = sync_once({"ft:tiny:a:1": first, "ft:tiny:b:2": second}, {}, vllm.url, "serving-key", say=said.append)
    assert loaded == {"ft:tiny:a:1": first, "ft:tiny:b:2": second} and vllm.loaded["ft:tiny:b:2"]["r"] == 16
    loaded = sync_once({"ft:tiny:b:2": second}, loaded, vllm.url, "serving-key", say=said.append)
    assert loaded == {"ft:tiny:b:2": second} and list(vllm.loaded) == ["ft:tiny:b:2"]
    assert said[-1] == "unloaded ft:tiny:a:1"

    # an adapter gone from the bucket is not loaded (and tried again next pass); vLLM away: nothing changes
    missing = f"s3://{BUCKET}/runs/gone/final/adapter"
    loaded = sync_once({"ft:tiny:b:2": second, "ft:tiny:c:3": missing}, loaded, vllm.url, "serving-key",
                       say=said.append)
    assert loaded == {"ft:tiny:b:2": second} and said[-1].startswith("could not fetch ft:tiny:c:3")
    assert sync_once({}, loaded, "http://127.0.0.1:9", "serving-key", say=said.append) == loaded
    assert sync_once({"ft:tiny:b:2": second}, {}, vllm.url, "wrong-key", say=said.append) == {}  # 401: not loaded
    vllm.loaded.clear()  # vLLM restarted: what it had is loaded again
    assert sync_once({"ft:tiny:b:2": second}, loaded, vllm.url, "serving-key", say=said.append) == loaded
    assert list(vllm.loaded) == ["ft:tiny:b:2"]


def test_the_list_file_is_read_defensively(tmp_path: Path) -> None:
    assert read_wanted(tmp_path / "absent.json") == {}  # the ConfigMap has no list yet
    (tmp_path / "broken.json").write_text('{"adapters": [{"name": "a"')
    assert read_wanted(tmp_path / "broken.json") is None  # half-written: keep what is loaded
    (tmp_path / "ok.json").write_text('{"adapters": [{"name": "a", "uri": "s3://b/a"}]}')
    assert read_wanted(tmp_path / "ok.json") == {"a": "s3://b/a"}
