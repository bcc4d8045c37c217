"""Adapters added to a running vLLM server without a redeploy: the serving pod's side.

A sidecar beside vLLM (`kubetune serve-adapters`, rendered with `serve.runtime_adapters`) reads the
list of adapters to serve — `{"adapters": [{"name": ..., "uri": ...}]}`, the ConfigMap the control
plane keeps, mounted as a file — every few seconds and makes vLLM serve exactly those: an adapter
listed and not loaded is fetched from storage (the pod's own credentials; the download cache on the
models volume) and loaded through vLLM's runtime LoRA API (`POST /v1/load_lora_adapter`, allowed by
`VLLM_ALLOW_RUNTIME_LORA_UPDATING`); one loaded and no longer listed is unloaded
(`/v1/unload_lora_adapter`). Each replica reconciles on its own, so a replica the autoscaler adds
loads the whole list. A failure is retried on the next pass; what loaded stays loaded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import httpx

__all__ = ["read_wanted", "run_sync", "sync_once"]


def read_wanted(path: Path) -> dict[str, str] | None:
    """name → adapter URI from the mounted list; {} when there is none yet; None when it cannot be
    read as a list (kept as it is: a half-written or broken file unloads nothing)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError:
        return None
    try:
        entries = json.loads(text or "{}").get("adapters", [])
        return {str(e["name"]): str(e["uri"]) for e in entries}
    except (ValueError, AttributeError, KeyError, TypeError):
        return None


def sync_once(wanted: dict[str, str], loaded: dict[str, str], vllm: str, api_key: str | None = None,
              fetch: Callable[[str], Path] | None = None, say: Callable[[str], None] = print) -> dict[str, str]:
    """One pass: unload what is no longer wanted (or now comes from another URI), load what is
    missing. Returns what is loaded afterwards (name → URI)."""
    if fetch is None:
        from kubetune.storage.fetch import fetch as fetch_uri

        fetch = fetch_uri
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    now = dict(loaded)
    with httpx.Client(base_url=vllm.rstrip("/"), headers=headers, timeout=300) as http:
        served = _served(http)
        if served is not None:  # a vLLM that restarted has none of them: load them again
            now = {k: v for k, v in now.items() if k in served}
        for name, uri in list(now.items()):
            if wanted.get(name) == uri:
                continue
            answer = _post(http, "/v1/unload_lora_adapter", {"lora_name": name})
            if answer is not None and (answer.status_code in (200, 404) or _says(answer, "cannot be found")):
                now.pop(name)  # unloaded, or vLLM no longer has it (restarted): either way it is not served
                say(f"unloaded {name}")
            else:
                say(f"could not unload {name}: {_why(answer)}")
        for name, uri in wanted.items():
            if name in now:
                continue
            try:
                folder = fetch(uri)
            except Exception as exc:  # noqa: BLE001 - storage away or the adapter gone: the next pass tries again
                say(f"could not fetch {name} from {uri}: {type(exc).__name__}: {exc}")
                continue
            answer = _post(http, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
            if answer is not None and (answer.status_code == 200 or _says(answer, "already been loaded")):
                now[name] = uri
                say(f"loaded {name} from {uri}")
            else:
                say(f"could not load {name}: {_why(answer)}")
    return now


def _post(http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response | None:
    try:
        return http.post(path, json=body)
    except httpx.HTTPError:
        return None


def _served(http: httpx.Client) -> set[str] | None:
    """The model names vLLM serves now (its LoRA adapters included), or None if it does not say."""
    try:
        answer = http.get("/v1/models")
        return {m["id"] for m in answer.json()["data"]} if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def _why(answer: httpx.Response | None) -> str:
    return f"HTTP {answer.status_code} {answer.text[:300]}" if answer is not None else "vLLM did not answer"


def _says(answer: httpx.Response, *texts: str) -> bool:
    return answer.status_code == 400 and any(t in answer.text.lower() for t in texts)


def run_sync(path: Path, vllm: str, interval: float = 5.0, api_key: str | None = None, once: bool = False,
             say: Callable[[str], None] = print) -> dict[str, str]:
    """Reconcile until stopped (or one pass, `once`), waiting for vLLM to be up first."""
    loaded: dict[str, str] = {}
    while True:
        wanted = read_wanted(path)
        if wanted is None:
            say(f"{path}: not a list of adapters ({{\"adapters\": [{{\"name\", \"uri\"}}]}}); kept what is loaded")
        elif _healthy(vllm):
            loaded = sync_once(wanted, loaded, vllm, api_key, say=say)
        if once:
            return loaded
        time.sleep(interval)


def _healthy(vllm: str) -> bool:
    try:
        return httpx.get(f"{vllm.rstrip('/')}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
