"""A pgqueuer consumer process for the peer side of drain.py and start_latency.py.

`python bench/pgq_consumer.py URL --mode drain|continuous [--batch-size N] [--starts FILE]`
runs one QueueManager on one asyncpg connection with a no-op entrypoint `noop`.
`drain` exits once the queue is empty; `continuous` runs until SIGTERM. With `--starts`,
each job appends "<job id> <time.time() at its start>" to FILE (flushed per line).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from datetime import timedelta

import asyncpg
import uvloop
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
from pgqueuer.domain.types import QueueExecutionMode
from subprocs import die_with_parent  # run as a script: bench/ is on sys.path


async def main(url: str, mode: str, batch_size: int, starts: str | None) -> None:
    conn = await asyncpg.connect(url)
    out = open(starts, "a", buffering=1) if starts else None  # noqa: SIM115
    try:
        qm = QueueManager(Queries(AsyncpgDriver(conn)))
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, qm.shutdown.set)

        @qm.entrypoint("noop")
        async def noop(job: Job) -> None:
            if out is not None:
                out.write(f"{job.id} {time.time()}\n")

        await qm.run(dequeue_timeout=timedelta(seconds=1), batch_size=batch_size,
                     mode=QueueExecutionMode.drain if mode == "drain" else QueueExecutionMode.continuous)
    finally:
        if out is not None:
            out.close()
        await conn.close(timeout=5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--mode", choices=("drain", "continuous"), default="drain")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--starts")
    args = parser.parse_args()
    die_with_parent()
    uvloop.run(main(args.url, args.mode, args.batch_size, args.starts))
