"""Small shared settings for Hugging Face libraries, applied at the edge (when a verb runs)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence


def quiet_progress_bars() -> None:
    """No tqdm bars ("Loading weights ...") when output is not a terminal: they are noise in pod logs."""
    if not sys.stdout.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def drop_log_message(logger_name: str, fragment: str) -> None:
    """Filter one known message out of a library's logger (a choice kubetune made on purpose, which the
    library warns about on every rank), keeping everything else it says."""
    import logging

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return fragment not in record.getMessage()

    logging.getLogger(logger_name).addFilter(_Drop())


# Conversations on which a merged model must compute what adapter-on-base computes (`kubetune merge`,
# and `kubetune serve` when it merges an adapter in memory).
PARITY_PROBES = [
    [{"role": "user", "content": "Describe a blue fox."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"}],
    [{"role": "user", "content": "Spell tree."}, {"role": "assistant", "content": "tree is spelled t-r-e-e."},
     {"role": "user", "content": "Thanks!"}],
]


@dataclass(frozen=True)
class Parity:
    """How far a merged model's logits are from adapter-on-base's on the probes."""
    max_diff: float       # largest |logit difference|
    scale: float          # root mean square of adapter-on-base's logits

    def within(self, tolerance: float) -> bool:
        """Same model: the difference is at most `tolerance` of the logits' scale (of 1, for logits smaller
        than that). fp32 round-off grows with the logits' size, depth and width; an absolute bound refused
        correct merges of deeper models, while a wrong merge moves logits by orders of magnitude more."""
        return self.max_diff <= tolerance * max(1.0, self.scale)

    def describe(self) -> str:
        return f"max |logit diff| {self.max_diff:.1e}, {self.max_diff / max(1.0, self.scale):.1e} of the logits' scale"


def merge_with_parity(peft_model: Any, inputs: Sequence[Sequence[int]]) -> tuple[Any, Parity]:
    """PEFT's merge_and_unload (safe_merge), and how much the merge changed the logits on `inputs` (token
    ids); the caller decides what it accepts (Parity.within)."""
    import torch

    batches = [torch.tensor([list(ids)]) for ids in inputs]
    with torch.no_grad():
        before = [peft_model(input_ids=b).logits.float() for b in batches]
        merged = peft_model.merge_and_unload(safe_merge=True)
        after = [merged(input_ids=b).logits.float() for b in batches]
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after))
    scale = max(float(b.pow(2).mean().sqrt()) for b in before)
    return merged, Parity(diff, scale)
