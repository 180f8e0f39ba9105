"""The dashboard in headless Chromium, end to end: the form, the live list, a task's steps,
answering and cancelling by clicking, the token prompt, and a server restart mid-task.

Needs Debian's Chromium at /usr/bin/chromium (Playwright drives it; no browser download).
Screenshots of each page at 1280 px and 390 px wide are saved under tests/output/.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cli.process import Process
from server.protocol.auth import mint
from tests.conftest import ws_url
from tests.restarting import Restartable
from tests.waiting import free_port
from tests.wsclient import Client

OUTPUT = Path(__file__).resolve().parents[1] / "output"
EXAMPLE_PAGE = Path(__file__).resolve().parents[2] / "client-example" / "page.html"
WIDE, PHONE = {"width": 1280, "height": 860}, {"width": 390, "height": 844}
WAIT_MS = 20_000
SECRET = "a-dashboard-test-secret-of-32-bytes-or-more"

class Tab:
    """A page of the dashboard; fails the test on any JavaScript error."""

    def __init__(self, page: Any, base: str) -> None:
        self.page = page
        self.base = base
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.set_default_timeout(WAIT_MS)

    async def open(self, route: str = "") -> None:
        await self.page.goto(self.base + route)
        await self.connected()

    async def connected(self) -> None:
        await self.page.wait_for_selector('#conn[data-state="open"]')

    async def step(self, name: str, status: str) -> None:
        await self.page.wait_for_selector(f'.timeline li[data-step="{name}"][data-status="{status}"]')

    async def status(self, status: str) -> None:
        await self.page.wait_for_selector(f'.task-head .badge[data-status="{status}"]')

    async def shot(self, name: str) -> None:
        OUTPUT.mkdir(exist_ok=True)
        await self.page.screenshot(path=str(OUTPUT / f"{name}.png"), full_page=True)

    def check(self) -> None:
        assert not self.errors, self.errors


@pytest.fixture
async def tabs(browser: Any) -> AsyncIterator[Any]:
    """Open dashboard tabs: `await tabs(base_url, viewport)`; closed after the test."""
    contexts: list[Any] = []
    opened: list[Tab] = []

    async def open_tab(base: str, viewport: dict[str, int] = WIDE) -> Tab:
        context = await browser.new_context(viewport=viewport)
        contexts.append(context)
        tab = Tab(await context.new_page(), base)
        opened.append(tab)
        return tab

    yield open_tab
    for context in contexts:
        await context.close()
    for tab in opened:
        tab.check()


def _base(process: Process) -> str:
    return f"http://127.0.0.1:{process.settings.port}/"


async def _task_id(tab: Tab) -> str:
    await tab.page.wait_for_url(re.compile(r"#/task/tsk_"))
    return str(await tab.page.get_attribute(".task-page", "data-task-id"))


async def test_create_from_the_form_follow_the_steps_and_answer_by_clicking(taskcast: Process,
                                                                             tabs: Any) -> None:
    """The form creates a demo task; each step turns running, then completed; the question's
    button answers it; the task completes; the list shows it without a reload."""
    tab = await tabs(_base(taskcast))
    await tab.open()
    await tab.page.click('.page-head a[href="#/new"]')
    assert json.loads(await tab.page.input_value("#input")) == {"steps": 5, "step_ms": 800, "ask_step": 3}
    await tab.page.fill("#scope", "project:ui")
    await tab.page.fill("#input", json.dumps({"steps": 3, "step_ms": 1500, "ask_step": 2}))
    await tab.page.click(".create-form button[type=submit]")
    task = await _task_id(tab)

    await tab.step("step_1", "running")
    await tab.step("step_1", "completed")
    await tab.page.wait_for_selector('.question button[data-answer="approve"]')
    await tab.status("waiting_answer")
    await tab.shot("task-question-1280")
    await tab.page.click('.question button[data-answer="approve"]')
    await tab.page.wait_for_selector(".question", state="detached")
    for name in ("step_2", "step_3"):
        await tab.step(name, "running")
        await tab.step(name, "completed")
    await tab.status("completed")
    # The input is shown although updates no longer carry it (the page asks `get` once).
    await tab.page.wait_for_selector('.details pre.json:has-text("step_ms")')
    assert await tab.page.locator(".timeline li[data-step]").count() == 3
    assert (await tab.page.inner_text('.timeline li[data-step="step_1"] .step-time')).endswith(" s")
    await tab.shot("task-completed-1280")

    await tab.page.click("text=← All tasks")
    row = tab.page.locator(f'.task-row[data-task-id="{task}"]')
    await row.wait_for()
    assert await row.get_attribute("data-status") == "completed"
    client = await Client.open(ws_url(taskcast))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "project:other",
                                "input": {"steps": 2, "step_ms": 300}})
    await tab.page.wait_for_selector(f'.task-row[data-task-id="{ack["task"]}"]')  # no reload
    await tab.page.select_option('select[data-filter="scope"]', "project:ui")
    await tab.page.wait_for_selector(f'.task-row[data-task-id="{ack["task"]}"]', state="detached")
    assert await tab.page.locator(".task-row").count() == 1
    await client.close()


async def test_cancel_and_retry_by_clicking_and_the_screenshots(taskcast: Process, tabs: Any) -> None:
    """Cancel stops a running task (its badge turns cancelled) and Retry runs it again; the
    list and task pages are captured at 1280 px and 390 px."""
    client = await Client.open(ws_url(taskcast))
    made = {}
    for scope, task_input in (("project:web", {"steps": 3, "step_ms": 50}),
                              ("repo:acme/api", {"steps": 40, "step_ms": 1000}),
                              ("project:42", {"steps": 4, "step_ms": 100, "ask_step": 3}),
                              ("project:42", {"steps": 50, "step_ms": 800})):
        ack = await client.request({"type": "create", "kind": "demo", "scope": scope, "input": task_input})
        made[scope] = ack["task"]
    long_task = made["project:42"]

    tab = await tabs(_base(taskcast))
    await tab.open(f"#/task/{long_task}")
    await tab.page.wait_for_selector('.timeline li[data-status="running"]')  # some step of 50 runs
    await tab.shot("task-running-1280")
    await tab.page.click('button[data-action="cancel"]')
    await tab.status("cancelled")
    assert await tab.page.locator('button[data-action="cancel"]').count() == 0
    await tab.page.click('button[data-action="retry"]')
    await tab.status("running")
    await tab.page.click('button[data-action="cancel"]')
    await tab.status("cancelled")

    await tab.open()
    done = made["project:web"]
    await tab.page.wait_for_selector(f'.task-row[data-task-id="{done}"][data-status="completed"]')
    await tab.page.wait_for_selector('.task-row[data-status="waiting_answer"]')
    await tab.shot("list-1280")

    phone = await tabs(_base(taskcast), PHONE)
    await phone.open()
    await phone.page.wait_for_selector('.task-row[data-status="waiting_answer"]')
    await phone.shot("list-390")
    await phone.open(f"#/task/{made['repo:acme/api']}")
    await phone.page.wait_for_selector('.timeline li[data-status="running"]')
    await phone.shot("task-running-390")
    await phone.page.click('button[data-action="cancel"]')
    await phone.status("cancelled")
    await phone.open("#/new")
    await phone.shot("create-390")
    await tab.open("#/new")
    await tab.shot("create-1280")
    await client.close()


async def test_a_restart_mid_task_reconnects_and_shows_every_step_once(server: Restartable,
                                                                       tabs: Any) -> None:
    """The server stops mid-task and starts again on the same port: the page shows that it
    is reconnecting, resumes, and ends with every step and every event shown exactly once."""
    client = await Client.open(server.ws_url)
    ack = await client.request({"type": "create", "kind": "demo", "scope": "project:restart",
                                "input": {"steps": 6, "step_ms": 600}})
    await client.close()
    tab = await tabs(server.http_url)
    await tab.open(f"#/task/{ack['task']}")
    await tab.step("step_2", "completed")
    await server.stop()
    await tab.page.wait_for_selector('#conn[data-state="reconnecting"]')
    await tab.shot("task-reconnecting-1280")
    await server.start()
    await tab.connected()
    await tab.status("completed")

    steps = await tab.page.eval_on_selector_all(".timeline li[data-step]",
                                                "els => els.map(e => e.dataset.step)")
    assert steps == [f"step_{i}" for i in range(1, 7)]
    assert await tab.page.locator('.timeline li[data-status="completed"]').count() == 6
    client = await Client.open(server.ws_url)
    history = (await client.request({"type": "history", "task": ack["task"]}))["data"]["events"]
    await client.close()
    await tab.page.wait_for_selector(f'.activity li[data-version="{len(history)}"]')
    versions = await tab.page.eval_on_selector_all(".activity li[data-version]",
                                                   "els => els.map(e => +e.dataset.version)")
    assert sorted(versions) == list(range(1, len(history) + 1))  # each once, none missing


async def test_a_server_with_a_secret_asks_for_a_token(launch: Any, tabs: Any) -> None:
    """Closed with 4401 at hello, the page asks for a token; once given (and stored), it connects."""
    port = free_port()
    process = await launch(secret=SECRET, port=port, allowed_origins=(f"http://127.0.0.1:{port}",))
    tab = await tabs(_base(process))
    await tab.page.goto(tab.base)
    await tab.page.wait_for_selector('#conn[data-state="unauthorized"]')
    await tab.page.wait_for_selector("#token-bar:not([hidden])")
    await tab.page.fill("#token", mint(SECRET, "ui", ["project:*"]))
    await tab.page.click("#token-bar button[type=submit]")
    await tab.connected()
    assert await tab.page.is_hidden("#token-bar")
    await tab.page.reload()
    await tab.connected()  # the token was kept in localStorage


async def test_the_example_page_follows_one_task(launch: Any, tabs: Any) -> None:
    """client-example/page.html, opened from a file (origin `null`, allowed as its README
    says), follows a task to its end."""
    taskcast = await launch(allowed_origins=("null",))
    client = await Client.open(ws_url(taskcast))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p:page",
                                "input": {"steps": 3, "step_ms": 200}})
    await client.close()
    tab = await tabs("")
    await tab.page.goto(f"{EXAMPLE_PAGE.as_uri()}?task={ack['task']}&url={ws_url(taskcast)}")
    await tab.page.wait_for_selector("#status:text-is('completed')")
    assert await tab.page.locator('#steps li[data-status="completed"]').count() == 3
