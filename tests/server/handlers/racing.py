"""Making a race between two frames deterministic, without mocking anything."""

from __future__ import annotations

from typing import Any

import orjson
from websockets.frames import Frame, Opcode

from tests.wsclient import Client


def in_one_write(client: Client, *frames: dict[str, Any]) -> None:
    """Send `frames` in a single TCP write, so the server reads them together and runs their
    handlers concurrently: each next one runs while the one before awaits the database."""
    client.ws.transport.write(b"".join(Frame(Opcode.TEXT, orjson.dumps(f)).serialize(mask=True)
                                       for f in frames))


async def answers(client: Client, *ids: str, seen: list[dict[str, Any]] | None = None,
                  within: float = 10.0) -> dict[str, dict[str, Any]]:
    """The frames answering `ids`, by id (every frame read is appended to `seen`)."""
    frames = seen if seen is not None else []
    found: dict[str, dict[str, Any]] = {}

    def match(frame: dict[str, Any]) -> bool:
        frames.append(frame)
        if frame.get("id") in ids and frame["type"] not in ("update", "ping"):
            found[frame["id"]] = frame
        return len(found) == len(ids)

    await client.until(match, within=within)
    return found


async def parked(url: str, token: str, scope: str) -> tuple[Client, str]:
    """A client of `token` and a task of `scope` it created, parked on its first question
    (it stays put while a race is run against it); the client is subscribed to it."""
    client = await Client.open(url, token=token)
    ack = await client.request({"type": "create", "kind": "demo", "scope": scope,
                                "input": {"steps": 1, "step_ms": 0, "ask_step": 1}, "subscribe": True})
    await client.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.question")
    return client, ack["task"]
