"""`kubetune push RUN --to URI`: publish a run's merged model (or its adapter) to the Hugging Face
Hub or to object storage, with the tokenizer, chat template and generation config saved with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from kubetune.errors import UsageError
from kubetune.storage.runs import Run
from kubetune.storage.stage import StageReport, copy_tree


def push(run: str, to: str, private: bool = True, api: Any = None, log: Callable[[str], None] = print) -> str:
    """Upload final/merged (else final/adapter); return where it went. `api` is an HfApi (tests pass a fake)."""
    final = Run.open(run).final_model()
    folder, what = final.folder, "merged model" if final.merged else "adapter"
    if to.startswith("hf://"):
        return _push_hub(folder, to.removeprefix("hf://").rstrip("/"), what, private, api, log)
    log(f"pushing the {what} {folder} → {to}")
    report = StageReport()
    copy_tree(folder, to, (), report, log, single=False)
    log(report.summary())
    return to


def _push_hub(folder: Path, repo: str, what: str, private: bool, api: Any, log: Callable[[str], None]) -> str:
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
                                   ignore_patterns=["training_args.bin", ".*"])
    except (HfHubHTTPError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"push to hf://{repo} failed: {reason}",
                         "check HF_TOKEN (a write token), the organisation name and network access") from None
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo}")

