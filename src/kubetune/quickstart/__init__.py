"""Offline assets for the quickstart and tests: `python -m kubetune.quickstart build-model|make-data`."""
