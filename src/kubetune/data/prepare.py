"""One call from a spec to encoded train/eval rows: what `validate`, `plan` and `train` share.

Local data is encoded once per content (see data/cache.py); a hit skips reading, checking and
tokenising entirely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.artifacts.manifest import sha256_file
from kubetune.data import cache
from kubetune.data.dataset import Samples, SourceReport, load_samples
from kubetune.data.encode import EncodeReport, encode_samples
from kubetune.data.formats import Sample
from kubetune.data.sources import local_files
from kubetune.data.template import ChatFormatter
from kubetune.errors import Problem
from kubetune.spec.models import RunSpec
from kubetune.storage import resolve_model
from kubetune.uris import is_hub


@dataclass
class Prepared:
    samples: Samples  # on a cache hit the train samples are not re-read (train is empty); eval samples are
    train: EncodeReport
    eval: EncodeReport
    formatter: ChatFormatter
    model_dir: Path
    has_chat: bool = True
    file_hashes: dict[str, str] = field(default_factory=dict)
    cached: bool = False

    def summary(self) -> list[str]:
        """What `validate` and `plan` report: each source, rows, token lengths, truncation, template."""
        lines = []
        for src in self.samples.sources:
            skipped = f", {src.skipped} skipped" if src.skipped else ""
            lines.append(f"  {src.uri}: {src.format}, {src.used} rows{skipped}, weight {src.weight:g}")
        tr = self.train
        st = tr.stats()
        lines.append(f"  train rows {len(tr.rows)}, eval rows {len(self.eval.rows)}")
        lines.append(f"  tokens per row: min {st['min']}  p50 {st['p50']}  p95 {st['p95']}  max {st['max']}")
        lines.append(f"  over max_length: {tr.truncated} truncated, {tr.dropped} dropped (of {tr.total})")
        lines.append(f"  chat template: {self.formatter.template_source}")
        if tr.split_note():
            lines.append(tr.split_note() or "")
        return lines


def prepare(spec: RunSpec, model_dir: Path | None = None, use_cache: bool = True) -> Prepared:
    """Load, check and tokenise the spec's data (no torch). Raises DataError/UsageError."""
    model_dir = model_dir or resolve_model(spec.model.base, spec.model.revision, only_tokenizer=True)
    formatter = ChatFormatter(model_dir, spec.model.chat_template)
    files = _local_data_files(spec)
    hashes = {str(p): sha256_file(p) for p in files} if files is not None else {}
    key = None
    if files is not None and use_cache:
        key = cache.cache_key({
            "data": spec.data.model_dump(mode="json"), "seed": spec.train.seed, "files": hashes,
            "tokenizer": sha256_file(model_dir / "tokenizer.json"), "format": formatter.fingerprint(),
        })
        hit = cache.load(key)
        if hit is not None:
            return _from_cache(hit, formatter, model_dir, hashes)
    samples = load_samples(spec.data, spec.train.seed)
    has_chat = any(s.messages for s in samples.train)
    if has_chat:
        formatter.stop  # noqa: B018 — fail early if the template cannot stop generation
    d = spec.data
    train = encode_samples(samples.train, formatter, d.max_length, d.too_long, d.loss_on, d.reasoning)
    evals = encode_samples(samples.eval, formatter, d.max_length, d.too_long, d.loss_on, d.reasoning)
    if key is not None:
        cache.save(key, train, evals, {
            "sources": [vars(s) for s in samples.sources], "files": [str(f) for f in samples.files],
            "skipped": [[p.where, p.message] for p in samples.skipped], "has_chat": has_chat,
            "eval_samples": [[s.where, list(s.messages) if s.messages else None, s.text,
                              list(s.tools) if s.tools else None] for s in samples.eval],
        })
    return Prepared(samples, train, evals, formatter, model_dir, has_chat, hashes)


def _local_data_files(spec: RunSpec) -> list[Path] | None:
    """Every file behind the spec's sources, or None when one is not local (Hub datasets)."""
    sources = spec.data.sources() + ([spec.data.eval_source()] if spec.data.eval_source() else [])
    if any(is_hub(s.path) for s in sources):
        return None
    return [f for s in sources for f in local_files(s.path)]


def _from_cache(hit: tuple[EncodeReport, EncodeReport, dict[str, Any]], formatter: ChatFormatter,
                model_dir: Path, hashes: dict[str, str]) -> Prepared:
    train, evals, meta = hit
    eval_samples = [Sample(w, tuple(m) if m else None, t, tuple(tl) if tl else None)
                    for w, m, t, tl in meta["eval_samples"]]
    samples = Samples(train=[], eval=eval_samples, sources=[SourceReport(**s) for s in meta["sources"]],
                      files=[Path(f) for f in meta["files"]], skipped=[Problem(w, m) for w, m in meta["skipped"]])
    if meta["has_chat"]:
        formatter.stop  # noqa: B018
    return Prepared(samples, train, evals, formatter, model_dir, meta["has_chat"], hashes, cached=True)
