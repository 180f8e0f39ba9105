"""taskcast.js from a page of another origin, in headless Chromium: the page imports the
module from the node (allowed by TASKCAST_ALLOWED_ORIGINS), creates a task, follows it
across a server restart and sees every version once, in order; a page of an origin that is
not allowed can neither load the module nor open a socket.

The other origin is a plain static HTTP server (python -m http.server) on another loopback
port, serving the page this test writes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from server.settings import Settings
from tests.restarting import Restartable
from tests.waiting import eventually, free_port, listening
from tests.wsclient import Client

WAIT_MS = 20_000
STOP_S = 10.0

# The page: what a user's own app does with the module (the README's three lines, and a
# create). Each version it is handed becomes one <li>; body's data-* say how far it got.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>my app</title></head>
<body><ol id="versions"></ol>
<script type="module">
  const node = new URLSearchParams(location.search).get("node");
  try {
    const { connect } = await import(`${node}/taskcast.js`);
    const tc = connect(node, { onState: (s) => { document.body.dataset.state = s.state; } });
    const ack = await tc.create({ kind: "demo", scope: "project:app", input: { steps: 6, step_ms: 400 } });
    document.body.dataset.task = ack.task;
    const task = tc.task(ack.task, { since: ack.position });
    task.on("change", (view, update) => {
      const li = document.createElement("li");
      li.dataset.version = update.event.version;
      li.textContent = `v${update.event.version} ${update.event.type}: ${view.status}`;
      document.getElementById("versions").append(li);
    });
    task.on("done", (view) => { document.body.dataset.done = view.status; });
  } catch (err) {
    document.body.dataset.error = String(err);
  }
</script></body></html>
"""


@pytest.fixture
async def other_origin(tmp_path: Path) -> AsyncIterator[str]:
    """A static HTTP server on another loopback port serving PAGE at /app.html; its origin."""
    (tmp_path / "app.html").write_text(PAGE)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await eventually(lambda: listening(port) or proc.poll() is not None)
        assert proc.poll() is None, "the page server did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, STOP_S)


@pytest.fixture
async def open_page(browser: Any) -> AsyncIterator[Callable[[str], Any]]:
    """Open a page in a fresh context; fails the test on any JavaScript error in it."""
    contexts: list[Any] = []
    errors: list[str] = []

    async def open_(url: str) -> Any:
        context = await browser.new_context()
        contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(WAIT_MS)
        await page.goto(url)
        return page

    yield open_
    for context in contexts:
        await context.close()
    assert not errors, errors


def _versions(page: Any) -> Any:
    return page.eval_on_selector_all("#versions li", "els => els.map(e => +e.dataset.version)")


async def test_a_page_of_another_origin_follows_a_task_across_a_restart(
        settings: Settings, other_origin: str, open_page: Any) -> None:
    """The page imports /taskcast.js from the node, creates a task and follows it; the server
    restarts mid-task; the page ends with every version after the create once, in order,
    the last one terminal."""
    server = Restartable(settings, allowed_origins=(other_origin,))
    await server.start()
    try:
        node = server.http_url.rstrip("/")
        page = await open_page(f"{other_origin}/app.html?node={node}")
        await page.wait_for_selector("#versions li[data-version='4']")
        await server.stop()
        await page.wait_for_selector("body[data-state='reconnecting']", state="attached")
        await server.start()
        await page.wait_for_selector("body[data-done='completed']", state="attached")
        task = await page.get_attribute("body", "data-task")
        client = await Client.open(server.ws_url)
        history = (await client.request({"type": "history", "task": task}))["data"]["events"]
        await client.close()
        assert history[-1]["type"] == "task.completed"
        # v1 is the create's own event (its ack): the page follows from there.
        assert await _versions(page) == list(range(2, len(history) + 1))
    finally:
        await server.stop()


async def test_a_page_of_an_origin_not_allowed_is_refused(settings: Settings, other_origin: str,
                                                          open_page: Any) -> None:
    """Without the page's origin in TASKCAST_ALLOWED_ORIGINS the browser may not load the
    module (no Access-Control-Allow-Origin) and the node refuses the page's websocket."""
    server = Restartable(settings, allowed_origins=("https://elsewhere.example",))
    await server.start()
    try:
        node = server.http_url.rstrip("/")
        page = await open_page(f"{other_origin}/app.html?node={node}")
        await page.wait_for_selector("body[data-error]", state="attached")
        assert "import" in (await page.get_attribute("body", "data-error") or "")
        opened = await page.evaluate("""url => new Promise((resolve) => {
            const ws = new WebSocket(url, ["taskcast.v1"]);
            ws.onopen = () => resolve(true);
            ws.onclose = () => resolve(false);
        })""", server.ws_url)
        assert opened is False
    finally:
        await server.stop()


def _get(url: str, origin: str) -> tuple[str | None, str | None]:
    request = urllib.request.Request(url, headers={"Origin": origin})
    with urllib.request.urlopen(request, timeout=STOP_S) as response:
        return response.headers.get("content-type"), response.headers.get("access-control-allow-origin")


async def test_the_module_is_served_as_javascript_to_allowed_origins(launch: Any) -> None:
    """/taskcast.js is JavaScript, with Access-Control-Allow-Origin for the allowed origins
    and the public URL's, and without it for any other origin."""
    process = await launch(allowed_origins=("http://app.example:8080/",), public_url="https://tasks.example/x")
    url = f"http://127.0.0.1:{process.settings.port}/taskcast.js"
    for origin in ("http://app.example:8080", "https://tasks.example"):
        kind, allowed = await asyncio.to_thread(_get, url, origin)
        assert (kind or "").startswith("text/javascript")
        assert allowed == origin
    assert (await asyncio.to_thread(_get, url, "http://evil.example"))[1] is None
