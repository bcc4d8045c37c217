"""The syntax of the URIs a spec names — a local path, `s3://`, `gs://`, `hf://org/name[@revision]`,
`pvc://claim/path` — known here and nowhere else. Pure string functions (no I/O): every layer may use
them; reading and writing what a URI names is `kubetune.storage`'s."""

from __future__ import annotations

REMOTE_SCHEMES = ("s3", "gs", "hf")


def scheme(uri: str) -> str:
    """s3, gs, hf, pvc, ... or "file" for a plain path."""
    return uri.split("://", 1)[0] if "://" in uri else "file"


def has_scheme(uri: str) -> bool:
    """Anything but a plain local path (file:// included)."""
    return "://" in uri


def is_remote(uri: str) -> bool:
    """Object storage or the Hub: read and written through a store, never as a local path."""
    return scheme(uri) in REMOTE_SCHEMES


def is_hub(uri: str) -> bool:
    return scheme(uri) == "hf"


def body(uri: str) -> str:
    """The URI without its scheme (bucket/key, claim/path, org/name@rev; a plain path as it is)."""
    return uri.split("://", 1)[1] if "://" in uri else uri


def hub_ref(uri: str, revision: str | None = None) -> tuple[str, str | None]:
    """`hf://org/name[@revision]` (or `org/name[@revision]`) → (org/name, revision); an explicit
    `revision` (model.revision) wins over the one in the URI. The one parser of the Hub's references."""
    repo, _, at = uri.removeprefix("hf://").partition("@")
    return repo, revision or at or None


def bucket(uri: str) -> str:
    """The bucket (s3://, gs://) or claim (pvc://) a URI names."""
    return body(uri).split("/", 1)[0]


def uri_basename(uri: str) -> str:
    """The last path segment of a URI or path, without a @revision: the name a model or file goes by."""
    return body(uri).split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1]
