"""Small shared settings for Hugging Face libraries, applied at the edge (when a verb runs)."""

from __future__ import annotations

import sys


def quiet_progress_bars() -> None:
    """No tqdm bars ("Loading weights ...") when output is not a terminal: they are noise in pod logs."""
    if not sys.stdout.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
