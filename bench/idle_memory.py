"""Server memory per idle websocket: the RSS (and USS) of a `taskcast serve` subprocess
with 0 sockets, then with 1,000 sockets after `hello`, then with one subscription each.

The node runs alone (no relay, no workers) on a scratch database, with RLIMIT_NOFILE
raised. This process opens the sockets with the `websockets` client (compression off,
subprotocol taskcast.v1, no keepalive pings) and waits for each `welcome` (then each
`subscribed`: every socket subscribes to a scope of its own, `scope:project:<n>`).
20 sockets are opened, used the same way and closed first, so that lazy imports and
first-use caches are in the baseline, not in the per-socket figure. Each memory figure
is the median of 5 samples 0.2 s apart, taken after a 1 s settle.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import orjson
import psutil
import uvloop
from benchlib import BUDGET_S, REDIS_URL, scratch_database, unique
from subprocs import Child, Children, cancel_on_sigterm, metrics, raise_nofile
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

SOCKETS = 1000
WARMUP_SOCKETS = 20
SAMPLES = 5
SETTLE_S = 1.0
CONCURRENCY = 100
TARGET_KB = 8.0  # per idle socket, at 10,000 sockets
KB = 1024


async def memory(child: Child) -> tuple[float, float | None]:
    """Median RSS and USS (None when psutil cannot read it) of `child`, in bytes."""
    await asyncio.sleep(SETTLE_S)
    rss: list[float] = []
    uss: list[float] = []
    for i in range(SAMPLES):
        if i:
            await asyncio.sleep(0.2)
        try:
            info = child.ps.memory_full_info()
            uss.append(float(info.uss))
        except (psutil.AccessDenied, AttributeError):
            info = child.ps.memory_info()
        rss.append(float(info.rss))
    return statistics.median(rss), statistics.median(uss) if uss else None


async def request(ws: ClientConnection, frame: dict[str, object], answer: str) -> None:
    await ws.send(orjson.dumps(frame).decode())
    while True:
        got = orjson.loads(await ws.recv())
        if got.get("id") == frame["id"]:
            if got["type"] != answer:
                raise RuntimeError(f"{frame['type']} was answered {got}")
            return


async def open_sockets(port: int, count: int) -> list[ClientConnection]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one() -> ClientConnection:
        async with gate:
            ws = await connect(f"ws://127.0.0.1:{port}/ws", compression=None, ping_interval=None,
                               subprotocols=[Subprotocol("taskcast.v1")], open_timeout=30)
            await request(ws, {"type": "hello", "id": 1, "client": "bench/1"}, "welcome")
            return ws

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def subscribe_each(sockets: list[ClientConnection], first: int = 0) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(n: int, ws: ClientConnection) -> None:
        async with gate:
            await request(ws, {"type": "subscribe", "id": 2, "channel": f"scope:project:{n}"}, "subscribed")

    await asyncio.gather(*(one(first + n, ws) for n, ws in enumerate(sockets)))


async def close_all(sockets: list[ClientConnection]) -> None:
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


async def wait_connections(port: int, count: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while (await metrics(port)).get("taskcast_connections") != count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node does not report {count} connections")
        await asyncio.sleep(0.05)


def mb(n: float) -> str:
    return f"{n / KB / KB:.1f} MB"


async def main(count: int) -> None:
    cancel_on_sigterm()
    limit = raise_nofile()
    sockets: list[ClientConnection] = []
    async with asyncio.timeout(BUDGET_S), scratch_database("idle") as url, \
            Children(url, REDIS_URL, unique("taskcast:bench:idle")) as children:
        node, port = await children.serve()
        try:
            warm = await open_sockets(port, WARMUP_SOCKETS)
            await subscribe_each(warm, first=count)
            await close_all(warm)
            await wait_connections(port, 0)
            before, before_uss = await memory(node)
            started = time.monotonic()
            sockets = await open_sockets(port, count)
            opened_s = time.monotonic() - started
            await wait_connections(port, count)
            hello, hello_uss = await memory(node)
            await subscribe_each(sockets)
            subscribed, subscribed_uss = await memory(node)
            m = await metrics(port)
        finally:
            await close_all(sockets)

    def per(after: float, base: float) -> float:
        return (after - base) / count / KB

    print(f"server memory per idle websocket: one `taskcast serve` subprocess (no relay, no workers), "
          f"{count:,} sockets from a websockets client (no compression, no pings), after a "
          f"{WARMUP_SOCKETS}-socket warm-up; RLIMIT_NOFILE {limit:,}; 1 KB = 1024 bytes; uvloop")
    print(f"  RSS: {mb(before)} with 0 sockets, {mb(hello)} with {count:,} after hello, {mb(subscribed)} "
          f"with one subscription each (node reports {m.get('taskcast_connections', 0):.0f} connections, "
          f"{m.get('taskcast_subscriptions', 0):.0f} subscriptions); {count:,} sockets opened in "
          f"{opened_s * 1000:.0f} ms")
    print(f"  idle after hello: {per(hello, before):.1f} KB RSS per socket; with one subscription: "
          f"{per(subscribed, before):.1f} KB RSS per socket (the subscription itself "
          f"{per(subscribed, hello):.1f} KB); target <= {TARGET_KB:.0f} KB: "
          f"{'met' if per(subscribed, before) <= TARGET_KB else 'NOT met'}")
    if before_uss is not None and hello_uss is not None and subscribed_uss is not None:
        print(f"  USS: {mb(before_uss)} -> {mb(hello_uss)} -> {mb(subscribed_uss)}: "
              f"{per(hello_uss, before_uss):.1f} KB per socket after hello, "
              f"{per(subscribed_uss, before_uss):.1f} KB with one subscription")
    print("  kernel socket buffers are not in these figures (they are not process memory)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=SOCKETS,
                        help="at most 1,000 without auth: the node's per-principal limit")
    uvloop.run(main(parser.parse_args().sockets))
