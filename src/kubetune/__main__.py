"""`python -m kubetune` (used by torchrun to start each rank)."""

from kubetune.cli import run

run()
