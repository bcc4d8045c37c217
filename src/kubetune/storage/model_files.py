"""Find a base model's files locally: a folder as is, or `hf://org/name[@revision]` downloaded
(or found in the Hugging Face cache) with huggingface_hub."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kubetune.errors import KubetuneError, TransientError, UsageError
from kubetune.uris import hub_ref

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json", "config.json"]


def resolve_model(uri: str, revision: str | None = None, only_tokenizer: bool = False) -> Path:
    """Local folder holding the model (or just its tokenizer and configs when ``only_tokenizer``)."""
    if uri.startswith("hf://"):
        return _from_hub(uri.removeprefix("hf://"), revision, only_tokenizer)
    if uri.startswith(("s3://", "gs://")):
        from kubetune.storage.fetch import fetch

        # transformers cannot read object storage: a verified local copy in the cache
        path = fetch(uri, include=TOKENIZER_FILES if only_tokenizer else (), exclude=("original/*",))
        if not (path / "config.json").exists():
            raise UsageError(f"model.base {uri}: not a model folder (no config.json there)",
                             "point model.base at a folder written by save_pretrained (kubetune stage copies one)")
        return path
    if uri.startswith("pvc://"):
        from kubetune.storage.store import pvc_path

        uri = str(pvc_path(uri))
    path = Path(uri)
    if not path.exists():
        hint = f"for a Hub model write hf://{uri}" if uri.count("/") == 1 else "check the path"
        raise UsageError(f"model.base {uri}: no such folder", hint)
    if not (path / "config.json").exists():
        raise UsageError(
            f"model.base {uri}: not a model folder (no config.json there)",
            "point model.base at a folder written by save_pretrained, or use hf://org/name",
        )
    return path


def _from_hub(repo: str, revision: str | None, only_tokenizer: bool) -> Path:
    repo, revision = hub_ref(repo, revision)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    meta = ["*.json", "*.jinja", "*.model", "*.txt"]
    try:
        if only_tokenizer:
            return Path(snapshot_download(repo, revision=revision, allow_patterns=TOKENIZER_FILES))
        # the shards the index lists, not every *.safetensors: some repositories ship the same weights
        # twice (Mistral's consolidated.safetensors beside the shards), which would double the download
        first = Path(snapshot_download(repo, revision=revision, allow_patterns=meta))
        index = first / "model.safetensors.index.json"
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
            ["*.safetensors"]
        return Path(snapshot_download(repo, revision=revision, allow_patterns=[*meta, *shards]))
    except (KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"model.base hf://{repo}: its model.safetensors.index.json has no weight_map ({exc})",
                         "point model.base at a repository saved by save_pretrained") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise hub_error(exc, f"model.base hf://{repo}: cannot download from the Hugging Face Hub",
                        "check the name, network access and HF_TOKEN (gated models need an accepted licence)") from None


def hub_error(exc: BaseException, what: str, hint: str) -> KubetuneError:
    """A Hub failure, by type and HTTP status: unreachable, 5xx or 429 may pass (TransientError);
    a missing or gated repository, a bad revision or offline mode is for the user to fix."""
    from kubetune.storage.store import exception_chain, http_status, is_connection_error

    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    status = http_status(exc)
    offline = any(type(e).__name__ == "OfflineModeIsEnabled" for e in exception_chain(exc)) or os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline and ((status is not None and (status >= 500 or status == 429)) or
                        (status is None and is_connection_error(exc))):
        return TransientError(f"{what} ({reason})", "the Hub did not answer; the same command retried later "
                                                    "continues (on Kubernetes the Job retries it)")
    return UsageError(f"{what} ({reason})", hint)



def read_model_config(model_dir: Path) -> dict[str, Any]:
    """The model's config.json as a dict ({} when absent or unreadable), without loading transformers."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
