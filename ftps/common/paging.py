"""Page sizes and page tokens of every list-style RPC (ListTasks, ListSubmissions, GetScores), one
way: ``page_size`` 0 means the default, more than the maximum means the maximum; a page token is
the sort key of the last item returned, as unpadded base64url of compact JSON — opaque to clients,
valid across calls and replicas (the next page starts after that key, whatever was added since)."""

from __future__ import annotations

import base64
import binascii
import json

from ftps.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    """A request's ``page_size``: 0 -> the default, above the maximum -> the maximum."""
    if requested < 0:
        raise InvalidArgument(f"page_size must be >= 0, got {requested}", field="page_size")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(key: list) -> str:
    """The token of a page that ends at ``key`` (JSON-serializable parts)."""
    return base64.urlsafe_b64encode(json.dumps(key, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_token(token: str, n: int, *, rpc: str) -> list | None:
    """The key a page token carries (``n`` parts), or None for the first page (""); InvalidArgument
    naming ``rpc`` for a token it did not return."""
    if not token:
        return None
    try:
        key = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        key = None
    if not isinstance(key, list) or len(key) != n:
        raise InvalidArgument(f"page_token is not one that {rpc} returned", reason="INVALID_PAGE_TOKEN",
                              field="page_token")
    return key
