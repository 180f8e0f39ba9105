"""`create` ack latency over the websocket: one client, sequential commands.

A whole taskcast process (gateway node and relay, no workers) runs in this process on a
free loopback port, like tests/conftest.py's `taskcast` fixture; one websocket client
sends `create` frames one at a time and times each from send to its `ack`.
Runs on uvloop (as `taskcast serve` does); `--asyncio` uses asyncio's default loop.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson
import uvloop
from benchlib import BUDGET_S, REDIS_URL, latency_line, scratch_database, unique
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from cli.process import Process, Roles
from server.settings import Settings

WARMUP = 200
COMMANDS = 2000
# The default (200 frames/s per socket) would answer most of these `rate_limited`.
RATE_PER_S = 1_000_000


async def request(ws: ClientConnection, frame: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Send `frame`; the answer with its id, and the seconds it took."""
    started = time.perf_counter()
    await ws.send(orjson.dumps(frame).decode())
    while True:
        answer: dict[str, Any] = orjson.loads(await ws.recv())
        if answer.get("id") == frame["id"] and answer["type"] not in ("update", "ping"):
            return answer, time.perf_counter() - started


async def creates(ws: ClientConnection, first_id: int, count: int) -> list[float]:
    latencies: list[float] = []
    for n in range(first_id, first_id + count):
        answer, took = await request(ws, {"type": "create", "id": n, "kind": "demo",
                                          "scope": "bench", "input": {}})
        if answer["type"] != "ack":
            raise RuntimeError(f"create {n} was answered {answer}")
        latencies.append(took)
    return latencies


async def main(loop_name: str) -> None:
    async with asyncio.timeout(BUDGET_S), scratch_database("ack") as url:
        settings = Settings(database_url=url, redis_url=REDIS_URL, port=0, node_id="bench",
                            channel=unique("taskcast:bench:ack"), rate_per_s=RATE_PER_S)
        async with Process(settings, Roles(serve=True, relay=True, workers=0)) as process:
            assert process.relay is not None
            await asyncio.wait_for(process.relay.leading.wait(), 10)
            try:
                ws = await connect(f"ws://127.0.0.1:{process.settings.port}/ws", compression=None,
                                   subprotocols=[Subprotocol("taskcast.v1")])
            except (InvalidHandshake, ConnectionClosed) as exc:
                raise SystemExit(f"the websocket handshake failed on {loop_name} ({exc}); on uvloop, "
                                 "see the traceback above (the transport check in "
                                 "server/transport/connection.py); "
                                 "try --asyncio") from None
            try:
                welcome, _ = await request(ws, {"type": "hello", "id": 0, "client": "bench/1"})
                assert welcome["type"] == "welcome", welcome
                await creates(ws, 1, WARMUP)
                started = time.perf_counter()
                latencies = await creates(ws, WARMUP + 1, COMMANDS)
                took = time.perf_counter() - started
            finally:
                await ws.close()
    print(f"create ack latency over the websocket (send -> ack), one client, {COMMANDS} sequential "
          f"creates after {WARMUP} warm-up; node + relay, no workers; rate limit raised to {RATE_PER_S:,}/s; "
          f"{loop_name}")
    print(f"  {latency_line(latencies)}; {COMMANDS / took:,.0f} creates/s")
    print("  client and server share one event loop in one process, over loopback TCP")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--asyncio", action="store_true", help="use asyncio's default event loop, not uvloop")
    if parser.parse_args().asyncio:
        asyncio.run(main("asyncio event loop"))
    else:
        uvloop.run(main("uvloop"))
