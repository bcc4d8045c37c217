"""API keys: random secrets shown once, stored only as SHA-256 digests.

A key is 256 random bits, so one unsalted SHA-256 is enough to make the stored digest useless to
a reader of the database (a slow password hash protects low-entropy secrets; these are not), and it
lets a request's key be found by one indexed lookup. The key's id is derived from its digest, so a
key given again with `--api-key` after a restart owns the same jobs and files.
"""

from __future__ import annotations

import hashlib
import secrets

__all__ = ["digest", "key_id", "new_key"]

PREFIX = "kt-"


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key_digest: str) -> str:
    return f"key-{key_digest[:16]}"
