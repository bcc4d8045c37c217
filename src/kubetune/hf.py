"""Small shared settings for Hugging Face libraries, applied at the edge (when a verb runs)."""

from __future__ import annotations

import sys
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


def merge_with_parity(peft_model: Any, inputs: Sequence[Sequence[int]]) -> tuple[Any, float]:
    """PEFT's merge_and_unload (safe_merge), and the largest |logit difference| the merge made on `inputs`
    (token ids); the caller decides what difference it accepts."""
    import torch

    batches = [torch.tensor([list(ids)]) for ids in inputs]
    with torch.no_grad():
        before = [peft_model(input_ids=b).logits.float() for b in batches]
        merged = peft_model.merge_and_unload(safe_merge=True)
        after = [merged(input_ids=b).logits.float() for b in batches]
    return merged, max(float((a - b).abs().max()) for a, b in zip(before, after))
