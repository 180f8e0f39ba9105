"""A bot: creates a task, approves its questions, and prints each step as it happens.

    python client-example/bot.py                      # a `provision` task named "demo"
    python client-example/bot.py --kind demo --input '{"steps":3,"step_ms":50,"ask_step":2}'

It answers every question with its first option (`approve` for an approval), or with
`--answer`. Exit status: 0 when the task completes, 1 when it fails, is cancelled or times
out, 2 when the server cannot be reached or refuses the request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import datetime
from typing import Any

from taskcast_client import TERMINAL, TaskcastClient, TaskcastError, Update
from websockets.exceptions import InvalidHandshake


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    parse = datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def describe(update: Update) -> str | None:
    """One line for the events a person wants to see (None for the others)."""
    data, kind = update.data, update.type
    step = data.get("step")
    if kind == "task.started":
        resumed = any(s["status"] == "completed" for s in update.task.get("steps", []))
        verb = "resumed" if resumed else "started"
        return f"task {update.task_id} {verb} (attempt {update.task.get('attempt', 1)})"
    if kind == "step.started":
        return f"  step {step}: started"
    if kind == "step.output":
        return "\n".join(f"  step {step} | {line}" for line in data.get("lines", []))
    if kind == "step.completed":
        view = next((s for s in update.task.get("steps", []) if s["name"] == step), {})
        took = _seconds_between(view.get("started_at"), view.get("ended_at"))
        return f"  step {step}: completed" + (f" in {took:.2f} s" if took is not None else "")
    if kind == "step.failed":
        return f"  step {step}: failed: {data.get('error')}"
    if kind == "task.retrying":
        return f"task retrying (attempt {data.get('attempt')}): {data.get('reason')}"
    if kind == "task.completed":
        return f"task completed: {json.dumps(data.get('result'))}"
    if kind in ("task.failed", "task.cancelled", "task.timed_out"):
        return f"task {kind.split('.')[1]}: {data.get('error') or data.get('reason') or ''}".rstrip(": ")
    return None


async def run(args: argparse.Namespace) -> int:
    answered: set[str] = set()
    async with TaskcastClient(args.url, token=args.token, name="taskcast-bot/1") as client:
        ack, updates = await client.create_and_follow(args.kind, args.scope, args.input)
        print(f"created {args.kind} task {ack['task']} in {args.scope} ({ack['status']})", flush=True)
        async for update in updates:
            line = describe(update)
            if line:
                print(line, flush=True)
            # Questions are read from the view, so one asked while we were reconnecting is
            # answered too (its `task.question` event may have been folded into a snapshot).
            for question in update.task.get("questions", []):
                if question["id"] in answered:
                    continue
                answered.add(question["id"])
                choice: Any = args.answer or (question.get("options") or ["approve"])[0]
                print(f"  question {question['id']}: {question.get('prompt')} -> {choice}", flush=True)
                try:
                    await client.answer(update.task_id, question["id"], choice)
                except TaskcastError as exc:
                    if exc.code != "conflict":  # conflict: someone else answered it first
                        raise
            if update.task["status"] in TERMINAL:
                return 0 if update.task["status"] == "completed" else 1
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("TASKCAST_URL", "ws://127.0.0.1:8000/ws"))
    parser.add_argument("--token", default=os.environ.get("TASKCAST_TOKEN"))
    parser.add_argument("--kind", default="provision")
    parser.add_argument("--input", type=json.loads, default={"name": "demo"}, help="the task's input (JSON)")
    parser.add_argument("--scope", default="project:bots")
    parser.add_argument("--answer", help="answer every question with this instead of its first option")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (OSError, InvalidHandshake, TaskcastError) as exc:
        print(f"bot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
