"""Content-addressed cache of encoded datasets: a second run with the same data skips tokenising.

The key covers everything that changes the tokens: the content of every data file, the tokenizer
file, the chat template and special tokens, the spec's data section and seed, and kubetune's
version. Entries are flat int32 arrays (ids, labels) plus offsets, so loading is a few `np.load`
calls — no per-token Python objects. Writes are atomic (temp folder + rename), so concurrent ranks
or a killed process never leave a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from kubetune import __version__, settings
from kubetune.data.encode import EncodeReport, Encoded

FORMAT = 2  # 2: multi-turn conversations of non-prefix-stable templates split per assistant turn


def cache_root() -> Path:
    return settings.cache_dir() / "data"


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"kubetune": __version__, "format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def save(key: str, train: EncodeReport, evals: EncodeReport, meta: dict[str, Any]) -> None:
    final = cache_root() / key
    if final.exists():
        return
    tmp = final.with_name(f".{key}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, rep in (("train", train), ("eval", evals)):
        ids = np.fromiter((t for r in rep.rows for t in r.input_ids), dtype=np.int32)
        labels = np.fromiter((t for r in rep.rows for t in r.labels), dtype=np.int32)
        offsets = np.cumsum([0] + [len(r.input_ids) for r in rep.rows], dtype=np.int64)
        np.save(tmp / f"{name}.ids.npy", ids)
        np.save(tmp / f"{name}.labels.npy", labels)
        np.save(tmp / f"{name}.offsets.npy", offsets)
        np.save(tmp / f"{name}.lengths.npy", np.asarray(rep.lengths, dtype=np.int32))
        meta[name] = {"truncated": rep.truncated, "dropped": rep.dropped,
                      "no_trained_tokens": rep.no_trained_tokens, "where": [r.where for r in rep.rows],
                      "split": [rep.split_conversations, rep.split_extra_tokens]}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        tmp.rename(final)
    except OSError:  # another process won the race with identical content
        shutil.rmtree(tmp, ignore_errors=True)


def load(key: str) -> tuple[EncodeReport, EncodeReport, dict[str, Any]] | None:
    folder = cache_root() / key
    try:
        meta = json.loads((folder / "meta.json").read_text())
        reports = [_load_report(folder, name, meta[name]) for name in ("train", "eval")]
    except (OSError, ValueError, KeyError):
        return None  # missing or damaged: recompute (and overwrite nothing that is good)
    return reports[0], reports[1], meta


def _load_report(folder: Path, name: str, meta: dict[str, Any]) -> EncodeReport:
    ids = np.load(folder / f"{name}.ids.npy")
    labels = np.load(folder / f"{name}.labels.npy")
    offsets = np.load(folder / f"{name}.offsets.npy")
    where = meta["where"]
    if len(where) != len(offsets) - 1:
        raise ValueError("cache entry is inconsistent")
    rows = [Encoded(ids[a:b], labels[a:b], w) for a, b, w in zip(offsets[:-1], offsets[1:], where)]
    report = EncodeReport(rows=rows, lengths=np.load(folder / f"{name}.lengths.npy").tolist())
    report.truncated, report.dropped = meta["truncated"], meta["dropped"]
    report.no_trained_tokens = meta["no_trained_tokens"]
    report.split_conversations, report.split_extra_tokens = meta["split"]
    return report
