"""Where a run's inputs and outputs live: local folders, object storage (s3://, gs://), the Hugging
Face Hub (hf://) and PVC mounts (pvc://), behind one Store; model folders resolved to local paths;
inputs staged. A run's own files are the `runs` package's."""

from kubetune.storage.model_files import read_model_config, resolve_model

__all__ = ["read_model_config", "resolve_model"]
