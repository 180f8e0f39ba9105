"""taskcast.js under Node's test runner (tests/js/), against a live server started here:
resume after a dropped socket, a command resent with its key, gap repair, the close-code
policy and the heartbeat. Skipped, saying so, where `node` is absent."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from server.protocol.auth import mint
from tests.waiting import run

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")
SECRET = "a-node-client-test-secret-of-32-bytes-or-more"
HEARTBEAT_S = 1.0  # short, so the heartbeat test sees a silent client closed if it were one
PRINCIPALS = ("resume", "key", "gap", "limit", "frame", "idle")  # one per test: its own limits
RUN_S = 90.0

pytestmark = pytest.mark.skipif(NODE is None, reason="needs Node.js (`node` on PATH) to run tests/js/")


async def test_the_module_passes_its_node_tests_against_a_live_server(launch: Any) -> None:
    """`node --test tests/js/` passes against a live taskcast (its own principals, one
    socket each, heartbeat 1 s)."""
    process = await launch(secret=SECRET, max_connections_per_principal=1, heartbeat_s=HEARTBEAT_S)
    env = {**os.environ,
           "TASKCAST_TEST_URL": f"ws://127.0.0.1:{process.settings.port}/ws",
           "TASKCAST_TEST_TOKENS": json.dumps({p: mint(SECRET, f"node-{p}", ["*"]) for p in PRINCIPALS}),
           "TASKCAST_TEST_BAD_TOKEN": mint("another-secret-of-32-bytes-or-more-than-that", "x", ["*"]),
           "TASKCAST_TEST_HEARTBEAT_S": str(HEARTBEAT_S)}
    assert NODE is not None
    status, out = await run(NODE, "--experimental-websocket", "--test", "--test-reporter=spec",
                            str(ROOT / "tests" / "js"), within=RUN_S, cwd=ROOT, env=env)
    assert status == 0, out
