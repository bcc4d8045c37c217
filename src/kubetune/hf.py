"""Small shared settings for Hugging Face libraries, applied at the edge (when a verb runs)."""

from __future__ import annotations

import sys


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
