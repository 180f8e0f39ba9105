"""Bytes in and out: the TCP connection, websocket framing, plain HTTP."""
