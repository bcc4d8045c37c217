"""Evaluation: generation with the run's template and stop tokens, metrics, reports."""
