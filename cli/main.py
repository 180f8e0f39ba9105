"""The `taskcast` command: dev, serve, worker, relay, migrate, token."""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import logging
import os
import socket
import sys
from contextlib import ExitStack
from pathlib import Path

from cli.supervisor import Supervisor, cores, reserve_port
from server.settings import Settings, SettingsError, from_env

DESCRIPTION = """taskcast: a realtime task event server.

  dev      everything in one process (embedded PostgreSQL and Valkey unless
           DATABASE_URL / REDIS_URL are set): migrations, server, relay, 2 workers
  serve    a websocket/HTTP server node (production: any number of them); --processes N
           runs N node processes on the one port (default: one per core)
  worker   a worker process that runs tasks (any number)
  relay    the relay from the event log to Redis (run two: one leads, one stands by)
  migrate  apply pending database migrations and exit
  token    mint a development token (needs TASKCAST_SECRET)
  create   create a task on a running server (--watch: follow it to the end)
  watch    follow a task, or every task of a scope, on a running server

dev, serve, worker, relay and migrate read DATABASE_URL and REDIS_URL from the environment;
create and watch talk to a running server (--url, TASKCAST_URL; --token, TASKCAST_TOKEN)."""


# The young generation the collector lets fill before it runs (the default is 700): each
# task's events, views and futures are many small containers, which at the default made
# the worker collect thousands of times a second. A worker collects every 50,000: its CPU
# per task in a drain went 190/199 -> 173/187 us (alternated runs, against 10,000). A node
# (and a relay) keeps 10,000: with 50,000 a node's commit -> socket p99 at 1,000 sockets
# was 19.2/21.8/21.9 ms against 25.0/17.0/16.3 (alternated, bench/latency_fanout.py),
# fewer pauses but longer ones.
YOUNG_OBJECTS = 10_000
WORKER_YOUNG_OBJECTS = 50_000


def _run(coro: object, *, young: int = YOUNG_OBJECTS) -> None:
    # What is alive now (modules, settings) lives as long as the process: frozen, the
    # collector never scans it again.
    gc.freeze()
    gc.set_threshold(young, 20, 20)
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover
        asyncio.run(coro)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="taskcast", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("dev", "run everything locally, with embedded servers when no URLs are set"),
                           ("serve", "run a server node")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--host", help="default: TASKCAST_HOST, else 127.0.0.1")
        p.add_argument("--port", type=int, help="default: TASKCAST_PORT, else 8000")
        p.add_argument("--insecure", action="store_true",
                       help="serve a non-loopback --host without TASKCAST_SECRET (everyone may do anything)")
        if name == "serve":
            p.add_argument("--processes", type=int,
                           help="node processes sharing the port (TASKCAST_PROCESSES; default: one per core)")
        if name == "dev":
            p.add_argument("--data-dir", default=os.environ.get("TASKCAST_DATA_DIR", ".taskcast"),
                           help="where embedded PostgreSQL and Valkey keep their data")
            p.add_argument("--workers", type=int, help="worker loops in this process (TASKCAST_WORKERS, 2)")
    p = sub.add_parser("worker", help="run a worker", description="claim and run tasks")
    p.add_argument("--concurrency", type=int,
                   help="tasks run at once (TASKCAST_WORKER_CONCURRENCY, 512)")
    sub.add_parser("relay", help="run the relay", description="publish the event log to Redis")
    sub.add_parser("migrate", help="apply migrations", description="apply pending migrations")
    p = sub.add_parser("token", help="mint a token", description="mint an HS256 token (TASKCAST_SECRET)")
    p.add_argument("subject")
    p.add_argument("--scope", action="append", default=[], help="scope pattern (repeatable)")
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires")
    # create / watch: clients of a running server, over the websocket (cli/watch.py)
    c = sub.add_parser("create", help="create a task on a running server",
                       description="create a task over the websocket; --watch follows it to the end")
    c.add_argument("kind")
    c.add_argument("--input", type=json.loads, default={}, help="the task's input, a JSON object")
    c.add_argument("--scope", default="project:demo")
    c.add_argument("--watch", action="store_true", help="follow the task until it ends")
    w = sub.add_parser("watch", help="follow tasks on a running server",
                       description="follow a task until it ends, or a scope's tasks until Ctrl-C")
    target = w.add_mutually_exclusive_group(required=True)
    target.add_argument("task", nargs="?", help="a task id")
    target.add_argument("--scope", help="every task of this scope")
    for client in (c, w):
        client.add_argument("--url", default=os.environ.get("TASKCAST_URL", "ws://127.0.0.1:8000/ws"))
        client.add_argument("--token", default=os.environ.get("TASKCAST_TOKEN"))
    args = parser.parse_args(argv)
    if args.command in ("create", "watch"):
        from cli import watch

        if args.command == "create":
            return watch.create(args.url, args.token, kind=args.kind, input_=args.input,
                                scope=args.scope, watch=args.watch)
        return watch.watch(args.url, args.token, task=args.task, scope=args.scope)
    logging.basicConfig(level=os.environ.get("TASKCAST_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "token":
        from server.protocol.auth import mint

        secret = os.environ.get("TASKCAST_SECRET")
        if not secret:
            print("taskcast token: set TASKCAST_SECRET", file=sys.stderr)
            return 2
        print(mint(secret, args.subject, args.scope or ["*"], ttl_s=args.ttl))
        return 0

    try:
        settings = from_env(node_id=f"{socket.gethostname()}:{os.getpid()}",
                            host=getattr(args, "host", None), port=getattr(args, "port", None),
                            workers=getattr(args, "workers", None),
                            processes=getattr(args, "processes", None),
                            worker_concurrency=getattr(args, "concurrency", None))
    except SettingsError as exc:
        print(f"taskcast: {exc}", file=sys.stderr)
        return 2
    if args.command in ("dev", "serve") and not _safe_to_serve(settings, settings.host, args.insecure):
        return 2
    if args.command == "dev":
        _configure_tracing(args.command)
        workspace_root = settings.workspace_root or str((Path(args.data_dir) / "workspaces").resolve())
        return dev(settings.with_(workspace_root=workspace_root), Path(args.data_dir), settings.workers)
    if not settings.database_url or not settings.redis_url:
        print(f"taskcast {args.command}: set DATABASE_URL and REDIS_URL (or use `taskcast dev`)",
              file=sys.stderr)
        return 2
    from cli.process import Process, Roles

    if args.command == "migrate":
        return _migrate(settings)
    if args.command == "serve":
        processes = settings.processes or cores()
        if processes > 1 and not settings.reuse_port:
            return _supervise(settings, processes, args.insecure)
        roles = Roles(serve=True)
    elif args.command == "worker":
        if not settings.workspace_root:
            print("taskcast worker: set TASKCAST_WORKSPACE_ROOT (where tasks' files live, one "
                  "directory per scope)", file=sys.stderr)
            return 2
        roles = Roles(workers=1)
    else:
        roles = Roles(relay=True)
    _configure_tracing(args.command)
    _run(Process(settings, roles).run_until_signal(),
         young=WORKER_YOUNG_OBJECTS if args.command == "worker" else YOUNG_OBJECTS)
    return 0


def _configure_tracing(command: str) -> None:
    """Tracing for a process that runs roles (not a supervisor, not `migrate`), when the
    OpenTelemetry SDK is installed (events/tracing.py), by the standard OTEL_* variables."""
    from events import tracing

    tracing.configure(f"taskcast-{command}", os.environ)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _safe_to_serve(settings: Settings, host: str, insecure: bool) -> bool:
    """Without a secret every client is the all-scopes `anonymous` principal: say so loudly,
    and refuse to listen beyond loopback unless told `--insecure`."""
    if settings.secret is not None:
        return True
    if not _loopback(host):
        if not insecure:
            print(f"taskcast: refusing to serve {host} without TASKCAST_SECRET: anyone who can reach it "
                  "could create, read and cancel every task. Set TASKCAST_SECRET, listen on 127.0.0.1, "
                  "or pass --insecure.", file=sys.stderr)
            return False
        logging.getLogger("taskcast").warning("SERVING %s WITHOUT AUTHENTICATION (--insecure)", host)
    logging.getLogger("taskcast").warning(
        "no TASKCAST_SECRET: authentication is OFF, every client may do anything in every scope "
        "(fine for development on loopback; set TASKCAST_SECRET otherwise)")
    return True


def _supervise(settings: Settings, processes: int, insecure: bool) -> int:
    """`serve --processes N`: N children of this command on one port (cli/supervisor.py)."""
    try:
        held = reserve_port(settings.host, settings.port)
    except OSError as exc:
        print(f"taskcast serve: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 2
    with held:
        port = held.getsockname()[1]
        command = [sys.executable, "-m", "cli.main", "serve", "--host", settings.host, "--port", str(port),
                   *(["--insecure"] if insecure else [])]
        env = {**os.environ, "TASKCAST_REUSE_PORT": "1", "TASKCAST_PROCESSES": "1"}
        logging.getLogger("taskcast").info("serving %s:%d with %d node processes", settings.host, port,
                                           processes)
        supervisor = Supervisor(command, processes, env, stop_deadline_s=3 * settings.stop_timeout_s + 5)
        code = 0

        async def go() -> None:
            nonlocal code
            code = await supervisor.run()

        _run(go())
        return code


def _migrate(settings: Settings) -> int:
    from events.errors import Unavailable
    from events.migrate import ChecksumMismatch, MigrationBlocked, migrate

    code = 0

    async def go() -> None:
        nonlocal code
        try:
            applied = await migrate(settings.database_url)
        except (ChecksumMismatch, MigrationBlocked, Unavailable) as exc:
            print(f"taskcast migrate: {exc}", file=sys.stderr)
            code = 1
            return
        print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")

    _run(go())
    return code


def dev(settings: Settings, data_dir: Path, workers: int) -> int:
    """Everything in one process; embedded PostgreSQL and Valkey unless URLs are set."""
    from cli.process import Process, Roles

    with ExitStack() as stack:
        if not settings.database_url or not settings.redis_url:
            from cli.embedded import EmbeddedPair

            print(f"starting embedded PostgreSQL and Valkey under {data_dir}/ ...", flush=True)
            database_url, redis_url = stack.enter_context(EmbeddedPair(data_dir.resolve()))
            settings = settings.with_(database_url=settings.database_url or database_url,
                                      redis_url=settings.redis_url or redis_url)
        if _migrate(settings):
            return 1  # said why

        def ready(process: Process) -> None:
            s = process.settings
            print(f"taskcast is running: http://{s.host}:{s.port}/ (websocket: ws://{s.host}:{s.port}/ws); "
                  "Ctrl-C stops", flush=True)

        async def go() -> None:
            await Process(settings, Roles(serve=True, relay=True, workers=workers)).run_until_signal(ready)

        _run(go())
    print("taskcast stopped; data kept in", data_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
