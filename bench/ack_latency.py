"""`create` ack latency over the websocket: one client, sequential commands.

A whole taskcast process (gateway node and relay, no workers) runs in this process on a
free loopback port, like tests/conftest.py's `taskcast` fixture; one websocket client
sends `create` frames one at a time and times each from send to its `ack`.
Runs on uvloop (as `taskcast serve` does); `--asyncio` uses asyncio's default loop.

The floor, in the same run and the same event loop: a raw `websockets` server
(websockets.asyncio.server) on another loopback port that answers each `create` frame by
one INSERT, through asyncpg on one connection, of a row the size of a `task.created`
event into a plain table of the shape of `events`, returning its position. The same
client sends to both, in alternating blocks of 200 commands.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
from typing import Any

import asyncpg
import orjson
import uvloop
from benchlib import BUDGET_S, REDIS_URL, events_shaped, latency_line, percentile, scratch_database, unique
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from cli.process import Process, Roles
from events.log import CreateTask
from server.settings import Settings

WARMUP = 200
COMMANDS = 2000
# The default (200 frames/s per socket) would answer most of these `rate_limited`.
RATE_PER_S = 1_000_000
BLOCK = 200  # commands to one server before switching to the other

FLOOR_TABLE = events_shaped("floor_events")
FLOOR_INSERT = ("INSERT INTO floor_events (task_id, version, scope, type, data, at) "
                "VALUES ($1, 1, $2, 'task.created', $3, now()) RETURNING xid::text, seq")


async def floor_handler(conn: asyncpg.Connection, ws: ServerConnection) -> None:
    """Per frame: `hello` -> `welcome`; anything else -> one INSERT, then `ack`."""
    serial = 0
    async for message in ws:
        frame = orjson.loads(message)
        if frame["type"] == "hello":
            await ws.send(orjson.dumps({"type": "welcome", "id": frame["id"]}).decode())
            continue
        serial += 1
        task = f"tsk_floor{serial:012d}"
        data = orjson.dumps(CreateTask(frame["kind"], frame["scope"], frame["input"]).data()).decode()
        row = await conn.fetchrow(FLOOR_INSERT, task, frame["scope"], data)
        await ws.send(orjson.dumps({"type": "ack", "id": frame["id"], "task": task, "status": "queued",
                                    "position": f"{row[0]}:{row[1]}", "duplicate": False}).decode())


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


async def client(port: int, loop_name: str) -> ClientConnection:
    try:
        ws = await connect(f"ws://127.0.0.1:{port}/ws", compression=None,
                           subprotocols=[Subprotocol("taskcast.v1")])
    except (InvalidHandshake, ConnectionClosed) as exc:
        raise SystemExit(f"the websocket handshake failed on {loop_name} ({exc}); on uvloop, "
                         "see the traceback above (the transport check in "
                         "server/transport/connection.py); "
                         "try --asyncio") from None
    welcome, _ = await request(ws, {"type": "hello", "id": 0, "client": "bench/1"})
    assert welcome["type"] == "welcome", welcome
    return ws


async def main(loop_name: str) -> None:
    async with asyncio.timeout(BUDGET_S), scratch_database("ack") as url:
        settings = Settings(database_url=url, redis_url=REDIS_URL, port=0, node_id="bench",
                            channel=unique("taskcast:bench:ack"), rate_per_s=RATE_PER_S)
        floor_db = await asyncpg.connect(url)
        try:
            await floor_db.execute(FLOOR_TABLE)
            async with Process(settings, Roles(serve=True, relay=True, workers=0)) as process, \
                    serve(functools.partial(floor_handler, floor_db), "127.0.0.1", 0, compression=None,
                          subprotocols=[Subprotocol("taskcast.v1")]) as floor:
                assert process.relay is not None
                await asyncio.wait_for(process.relay.leading.wait(), 10)
                floor_port = next(iter(floor.sockets)).getsockname()[1]
                ws = await client(process.settings.port, loop_name)
                fws = await client(floor_port, loop_name)
                try:
                    await creates(ws, 1, WARMUP)
                    await creates(fws, 1, WARMUP)
                    latencies: list[float] = []
                    floor_latencies: list[float] = []
                    for first in range(WARMUP + 1, WARMUP + 1 + COMMANDS, BLOCK):
                        n = min(BLOCK, WARMUP + 1 + COMMANDS - first)
                        latencies += await creates(ws, first, n)
                        floor_latencies += await creates(fws, first, n)
                finally:
                    await ws.close()
                    await fws.close()
        finally:
            await floor_db.close()
    print(f"create ack latency over the websocket (send -> ack), one client, {COMMANDS} sequential "
          f"creates after {WARMUP} warm-up, in blocks of {BLOCK} alternating with the floor; node + relay, "
          f"no workers; rate limit raised to {RATE_PER_S:,}/s; {loop_name}")
    print(f"  taskcast: {latency_line(latencies)}; {len(latencies) / sum(latencies):,.0f} creates/s")
    print(f"  floor (raw websockets server, one asyncpg INSERT of a task.created-sized row per frame): "
          f"{latency_line(floor_latencies)}; {len(floor_latencies) / sum(floor_latencies):,.0f} creates/s")
    tc, fl = sorted(latencies), sorted(floor_latencies)
    p50, p99 = percentile(tc, 50) * 1000, percentile(tc, 99) * 1000
    print(f"  p50 ratio taskcast / floor {p50 / (percentile(fl, 50) * 1000):.2f} (target <= 1.3); "
          f"taskcast p99 {p99:.2f} ms (target <= 2 ms)")
    print("  client and both servers share one event loop in one process, over loopback TCP")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--asyncio", action="store_true", help="use asyncio's default event loop, not uvloop")
    if parser.parse_args().asyncio:
        asyncio.run(main("asyncio event loop"))
    else:
        uvloop.run(main("uvloop"))
