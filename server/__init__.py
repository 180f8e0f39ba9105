"""taskcast's server: websocket gateway, HTTP, fan-out, auth and CLI."""
