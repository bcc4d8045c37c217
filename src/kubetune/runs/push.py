"""`kubetune push RUN --to URI`: publish a run's merged model (or its adapter) to the Hugging Face
Hub or to object storage, with the tokenizer, chat template and generation config saved with it,
and a model card (README.md: base, data hashes, method, eval metrics) written from the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from kubetune.artifacts.model_card import model_card
from kubetune.errors import UsageError
from kubetune.runs.run import Run
from kubetune.storage.stage import StageReport, copy_tree
from kubetune.storage.store import Store
from kubetune.uris import body, is_hub


def push(run: str, to: str, private: bool = True, api: Any = None, log: Callable[[str], None] = print) -> str:
    """Upload final/merged (else final/adapter) with its model card (README.md); return where it went.
    `api` is an HfApi (tests pass a recorder)."""
    opened = Run.open(run)
    final = opened.final_model(merged_if_present=True)  # a merge is published whole: no base needed to load it
    folder, what = final.folder, "merged model" if final.merged else "adapter"
    card = card_of(opened, final.merged)
    if is_hub(to):
        return _push_hub(folder, body(to).rstrip("/"), what, private, api, log, card)
    log(f"pushing the {what} {folder} → {to}")
    report = StageReport()
    copy_tree(folder, to, (), report, log, single=False)
    Store(to).write_text("README.md", card)
    log(report.summary() + ", and the model card README.md")
    return to


def card_of(run: Run, merged: bool) -> str:
    """The model card, from what the run recorded (its spec, manifest and eval metrics)."""
    assert run.spec is not None
    manifest = _json(run.layout.manifest)
    metrics = _json(run.layout.eval_metrics)
    return model_card(run.spec, manifest, metrics or None, merged)


def _json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _push_hub(folder: Path, repo: str, what: str, private: bool, api: Any, log: Callable[[str], None],
              card: str) -> str:
    if repo.count("/") != 1:
        raise UsageError(f"push --to hf://{repo}: expected hf://ORG/NAME")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()  # token from HF_TOKEN / the login cache: never passed on the command line
    from huggingface_hub.errors import HfHubHTTPError

    log(f"pushing the {what} {folder} → https://huggingface.co/{repo}")
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                   commit_message=f"kubetune: {what} of run {folder.parent.parent.name}",
                                   ignore_patterns=["training_args.bin", ".*", "README.md"])
        api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo, repo_type="model",
                        commit_message="kubetune: model card")
    except (HfHubHTTPError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"push to hf://{repo} failed: {reason}",
                         "check HF_TOKEN (a write token), the organisation name and network access") from None
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo}")

