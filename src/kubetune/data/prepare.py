"""One call from a spec to encoded train/eval rows: what `validate`, `plan` and `train` share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kubetune.data.dataset import Samples, load_samples
from kubetune.data.encode import EncodeReport, encode_samples
from kubetune.data.template import ChatFormatter
from kubetune.spec.models import RunSpec
from kubetune.storage import resolve_model


@dataclass
class Prepared:
    samples: Samples
    train: EncodeReport
    eval: EncodeReport
    formatter: ChatFormatter
    model_dir: Path


def prepare(spec: RunSpec, model_dir: Path | None = None) -> Prepared:
    """Load, check and tokenise the spec's data (no torch). Raises DataError/UsageError."""
    samples = load_samples(spec.data, spec.train.seed)
    model_dir = model_dir or resolve_model(spec.model.base, spec.model.revision, only_tokenizer=True)
    formatter = ChatFormatter(model_dir, spec.model.chat_template)
    if any(s.messages for s in samples.train):
        formatter.stop  # noqa: B018 — fail early if the template cannot stop generation
    d = spec.data
    train = encode_samples(samples.train, formatter, d.max_length, d.too_long, d.loss_on)
    evals = encode_samples(samples.eval, formatter, d.max_length, d.too_long, d.loss_on)
    return Prepared(samples, train, evals, formatter, model_dir)
