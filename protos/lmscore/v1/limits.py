"""Size limits of the contract that servers and clients share (standard library only)."""

from __future__ import annotations

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""The gRPC message size a server allows by default (`lmscore serve --max-message-bytes`),
each way. Clients size their requests by it: a request over it is refused by gRPC itself,
before the server reads it."""
