"""Bearer tokens, checked the same way for every transport (the gRPC interceptor and the
HTTP routes): `Authorization: Bearer TOKEN` with one of the server's tokens."""

from __future__ import annotations

import hmac
from collections.abc import Sequence


class BearerTokens:
    """The tokens a call may present; compared in constant time, each of them, so the time
    taken says nothing about which one matched."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens or any(not t for t in tokens):
            raise ValueError("auth needs at least one non-empty token")
        self._tokens = [t.encode() for t in tokens]

    def accepts(self, header: str | bytes | None) -> bool:
        """Whether an authorization header value (`Bearer TOKEN`) presents a valid token."""
        if isinstance(header, bytes):
            header = header.decode(errors="replace")
        scheme, _, token = (header or "").partition(" ")
        presented = token.strip().encode()
        matches = [hmac.compare_digest(presented, t) for t in self._tokens]
        return scheme.lower() == "bearer" and any(matches)
