"""Server paths out of what a tenant reads. A job's error or event text comes from processes that
name files as they found them (the run's folder, a cache copy, the models root); the caller gets
the last part of each path or storage URI (`checkpoint-20`, `train.jsonl`), never where the
server keeps it."""

from __future__ import annotations

import re

__all__ = ["redact"]

_URI = re.compile(r"\b(?:s3|gs|pvc|file|hf|https?)://[^\s'\"()<>,;]+")
_PATH = re.compile(r"(?<![\w./])~?(?:/[\w.@+=-]+){2,}/?")


def _last(match: re.Match[str]) -> str:
    return match.group(0).rstrip("/").rsplit("/", 1)[-1]


def redact(text: str) -> str:
    return _PATH.sub(_last, _URI.sub(_last, text))
