"""Kubernetes: `render` (pure functions: spec → list of objects) and `client` (apply, watch, logs, delete)."""
