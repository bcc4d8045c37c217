"""A run's records: folder layout, typed events, checkpoints (COMPLETE markers), manifest, trackers."""
