"""URIs → local paths. This version resolves local folders and Hugging Face Hub models; object
storage (s3://, gs://, pvc://) arrives with the storage issue behind the same functions."""

from kubetune.storage.models import read_model_config, resolve_model

__all__ = ["read_model_config", "resolve_model"]
