"""Data: sources, formats, chat templates with loss masks, encoding and the validation report."""
