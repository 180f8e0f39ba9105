"""Server-to-client websocket frames, built once and written to many sockets.

A server frame is not masked, so the same bytes serve every recipient: fan-out encodes an
update once per node and writes it with `transport.write` (RFC 6455, section 5.2).
"""

from __future__ import annotations

import struct

_TEXT_FIN = 0x81


def text(payload: bytes) -> bytes:
    """A complete, final text frame carrying `payload` (UTF-8 JSON)."""
    n = len(payload)
    if n < 126:
        return bytes((_TEXT_FIN, n)) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", _TEXT_FIN, 126, n) + payload
    return struct.pack("!BBQ", _TEXT_FIN, 127, n) + payload


def payload(frame: bytes) -> bytes:
    """The payload of a frame `text` built (SSE writes the same update bytes unframed)."""
    n = frame[1]
    return frame[2 + (2 if n == 126 else 8 if n == 127 else 0):]
