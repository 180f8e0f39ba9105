"""A raw websocket client for tests: JSON frames over `websockets`, nothing of taskcast's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

DEADLINE_S = 10.0


class Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 0
        self.backlog: list[dict[str, Any]] = []  # frames skipped while awaiting an answer

    @classmethod
    async def open(cls, url: str, *, hello: bool = True, token: str | None = None) -> Client:
        ws = await connect(url, subprotocols=["taskcast.v1"], compression=None)  # type: ignore[list-item]
        client = cls(ws)
        if hello:
            frame: dict[str, Any] = {"type": "hello", "client": "tests/1"}
            if token is not None:
                frame["token"] = token
            welcome = await client.request(frame)
            assert welcome["type"] == "welcome", welcome
        return client

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(frame).decode())

    async def recv(self, within: float = DEADLINE_S) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), within)
        frame: dict[str, Any] = orjson.loads(raw)
        return frame

    async def request(self, frame: dict[str, Any], within: float = DEADLINE_S) -> dict[str, Any]:
        """Send `frame` with a fresh id; return the frame answering it (others are skipped)."""
        self.next_id += 1
        frame = {**frame, "id": self.next_id}
        await self.send(frame)
        wanted = self.next_id
        async with asyncio.timeout(within):
            while True:
                answer = await self.recv(within)
                if answer.get("id") == wanted and answer["type"] not in ("update", "ping"):
                    return answer
                self.backlog.append(answer)

    async def until(self, match: Callable[[dict[str, Any]], bool],
                    within: float = DEADLINE_S) -> dict[str, Any]:
        """The first frame that matches, within `within` seconds (frames skipped by
        `request` are looked at first)."""
        while self.backlog:
            frame = self.backlog.pop(0)
            if match(frame):
                return frame
        async with asyncio.timeout(within):
            while True:
                frame = await self.recv(within)
                if match(frame):
                    return frame

    async def close(self) -> None:
        await self.ws.close()


class Versions:
    """Records each task's versions from update frames; as a `Client.until` predicate it is
    true once every task of `tasks` has completed."""

    def __init__(self, tasks: list[str] | None = None) -> None:
        self.tasks = tasks if tasks is not None else []
        self.versions: dict[str, list[int]] = {}
        self.finished: set[str] = set()

    def __call__(self, frame: dict[str, Any]) -> bool:
        if frame["type"] == "update":
            event = frame["event"]
            self.versions.setdefault(event["task"], []).append(event["version"])
            if event["type"] == "task.completed":
                self.finished.add(event["task"])
        return bool(self.tasks) and self.finished >= set(self.tasks)
