"""The run spec: typed models, loading with `--set` overrides, JSON Schema export."""

from kubetune.spec.load import load_spec, spec_to_yaml, validate_spec
from kubetune.spec.models import RunSpec

__all__ = ["RunSpec", "load_spec", "spec_to_yaml", "validate_spec"]
