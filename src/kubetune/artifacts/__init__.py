"""The run folder: layout, events, checkpoints (COMPLETE markers), manifest, merge."""
