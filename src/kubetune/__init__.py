"""kubetune: fine-tune, evaluate and serve open LLMs from one run spec, locally or on Kubernetes.

Importing kubetune is cheap: torch and transformers load only inside the functions that train,
merge or generate, so `validate`, `plan`'s spec checks, `schema` and `--help` start fast.
"""

__version__ = "0.1.0"
