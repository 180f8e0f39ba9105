// taskcast.js under Node's test runner, against a live server that
// tests/server/test_taskcast_js_node.py starts (and names in the environment): resume after a
// dropped socket, a version gap repaired, the close-code policy, the heartbeat.
//
// Run by that pytest test (`make test`); by hand: node --experimental-websocket --test tests/js/
// with TASKCAST_TEST_URL, TASKCAST_TEST_TOKENS, TASKCAST_TEST_BAD_TOKEN set as it sets them.

import assert from "node:assert/strict";
import net from "node:net";
import { test } from "node:test";

import { connect } from "../../server/static/taskcast.js";

const URL = process.env.TASKCAST_TEST_URL; // ws://127.0.0.1:<port>/ws
const TOKENS = JSON.parse(process.env.TASKCAST_TEST_TOKENS || "{}"); // a principal per test
const BAD_TOKEN = process.env.TASKCAST_TEST_BAD_TOKEN; // signed with another secret
const HEARTBEAT_S = Number(process.env.TASKCAST_TEST_HEARTBEAT_S);
const FAST = { backoffBaseMs: 20, backoffMaxMs: 200 }; // reconnect soon: the tests wait for it
const WAIT_MS = 20000;
const TERMINAL = new Set(["completed", "failed", "cancelled", "timed_out"]);

/** Resolves once `condition()` is true; fails after `ms`. */
async function until(condition, what, ms = WAIT_MS) {
  const end = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A TCP relay to the server: drop() cuts every connection through it, with no close frame,
 * as a network does. */
async function relay() {
  const port = Number(new globalThis.URL(URL).port);
  const sockets = new Set();
  const server = net.createServer((down) => {
    const up = net.connect(port, "127.0.0.1");
    for (const [a, b] of [[down, up], [up, down]]) {
      sockets.add(a);
      a.pipe(b);
      a.on("error", () => {});
      a.on("close", () => {
        sockets.delete(a);
        b.destroy();
      });
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `ws://127.0.0.1:${server.address().port}/ws`,
    drop: () => sockets.forEach((s) => s.destroy()),
    close: () => new Promise((resolve) => {
      sockets.forEach((s) => s.destroy());
      server.close(resolve);
    }),
  };
}

/** A WebSocket that records each socket made, and lets a test look at what is sent and drop
 * what is received. */
function recording({ onSend = () => {}, drop = () => false } = {}) {
  const made = [];
  class Recorded extends WebSocket {
    constructor(...args) {
      super(...args);
      made.push(this);
    }

    send(data) {
      super.send(data);
      onSend(JSON.parse(data));
    }

    set onmessage(listener) {
      super.onmessage = (msg) => drop(JSON.parse(msg.data)) || listener(msg);
    }

    get onmessage() {
      return super.onmessage;
    }
  }
  return { WebSocket: Recorded, made };
}

/** Follow a task after `since`: the updates handed over, in order, and whether it ended. */
function follow(client, task, since) {
  const updates = [];
  const sub = client.subscribe(`task:${task}`, { since }, (update) => updates.push(update));
  const ended = () => updates.length && updates.at(-1).task && TERMINAL.has(updates.at(-1).task.status);
  return { updates, sub, ended };
}

async function allVersions(client, task) {
  const { events } = await client.history(task);
  return events.map((e) => e.version);
}

test("a dropped socket is reconnected and the subscription resumes: every version once, in order", async () => {
  const net_ = await relay();
  const states = [];
  const client = connect(net_.url, { token: TOKENS.resume, ...FAST, onState: (s) => states.push(s.state) });
  try {
    const ack = await client.create({ kind: "demo", scope: "project:resume", input: { steps: 5, step_ms: 200 } });
    const run = follow(client, ack.task, ack.position);
    await until(() => run.updates.length >= 3, "three versions");
    assert.ok(!run.ended(), "the task ended before the drop");
    net_.drop();
    await until(() => states.includes("reconnecting"), "the drop to be seen");
    await until(run.ended, "the task's end");
    assert.equal(client.state, "open");
    const versions = run.updates.map((u) => u.event.version);
    assert.deepEqual([1, ...versions], await allVersions(client, ack.task));
  } finally {
    client.close();
    await net_.close();
  }
});

test("a command whose ack a drop lost is sent again with its key: one task", async () => {
  const net_ = await relay();
  const keys = [];
  const ws = recording({
    onSend: (frame) => {
      if (frame.type !== "create") return;
      keys.push(frame.key);
      if (keys.length === 1) setImmediate(net_.drop); // before its ack can come back
    },
  });
  const client = connect(net_.url, { token: TOKENS.key, ...FAST, WebSocket: ws.WebSocket });
  try {
    const ack = await client.create({ kind: "demo", scope: "project:key", input: { steps: 1, step_ms: 1 } });
    assert.equal(keys.length, 2); // sent again on the next socket...
    assert.equal(keys[0], keys[1]); // ...with the same key
    const { tasks } = await client.list({ scope: "project:key" });
    assert.deepEqual(tasks.map((t) => t.id), [ack.task]);
  } finally {
    client.close();
    await net_.close();
  }
});

test("a version gap is filled from history before anything after it is handed over", async () => {
  let lost = null;
  const ws = recording({
    drop: (frame) => {
      if (frame.type !== "update" || frame.event.version !== 3 || lost) return false;
      lost = frame.event.version; // the socket loses v3 (as a faulty path would)
      return true;
    },
  });
  const client = connect(URL, { token: TOKENS.gap, WebSocket: ws.WebSocket });
  try {
    const ack = await client.create({ kind: "demo", scope: "project:gap", input: { steps: 3, step_ms: 100 } });
    const run = follow(client, ack.task, ack.position);
    await until(run.ended, "the task's end");
    assert.equal(lost, 3);
    const versions = run.updates.map((u) => u.event.version);
    assert.deepEqual([1, ...versions], await allVersions(client, ack.task));
    assert.deepEqual(run.updates.filter((u) => u.repaired).map((u) => u.event.version), [3]);
    assert.equal(ws.made.length, 1); // repaired on the same socket
  } finally {
    client.close();
  }
});

test("a retryable close (4429: too many connections) is retried until it is let in", async () => {
  const first = connect(URL, { token: TOKENS.limit, ...FAST });
  const codes = [];
  let second = null;
  try {
    await until(() => first.state === "open", "the first socket");
    second = connect(URL, { token: TOKENS.limit, ...FAST, onState: (s) => s.code && codes.push(s.code) });
    await until(() => codes.includes(4429), "the second socket to be refused with 4429");
    assert.notEqual(second.state, "closed");
    first.close(); // the principal's one socket is free again
    await until(() => second.state === "open", "the second socket to get in");
  } finally {
    first.close();
    second?.close();
  }
});

test("4401 (a bad token) closes for good: no reconnect, requests fail with `closed`", async () => {
  const ws = recording();
  let last = null;
  const client = connect(URL, { token: BAD_TOKEN, ...FAST, WebSocket: ws.WebSocket, onState: (s) => { last = s; } });
  await until(() => client.state === "closed", "the close");
  assert.equal(last.code, 4401);
  await assert.rejects(client.get("tsk_x"), { code: "closed" });
  await pause(5 * FAST.backoffMaxMs); // longer than any backoff: a reconnect would be made by now
  assert.equal(ws.made.length, 1);
});

test("1009 (a frame too large) closes for good: the command fails, nothing is retried", async () => {
  const ws = recording();
  const client = connect(URL, { token: TOKENS.frame, ...FAST, WebSocket: ws.WebSocket });
  const huge = "x".repeat(300 * 1024); // past max_frame_bytes (256 KiB)
  await assert.rejects(client.create({ kind: "demo", scope: "project:frame", input: { huge } }),
    { code: "closed", closeCode: 1009 });
  assert.equal(client.state, "closed");
  await pause(5 * FAST.backoffMaxMs);
  assert.equal(ws.made.length, 1);
});

test("an idle client stays connected past 2 × heartbeat_s: it pings when it has said nothing", async () => {
  const ws = recording();
  const client = connect(URL, { token: TOKENS.idle, WebSocket: ws.WebSocket });
  try {
    await until(() => client.state === "open", "the socket");
    await pause(3 * HEARTBEAT_S * 1000); // a silent client is closed (4408) after 2 × heartbeat_s
    assert.equal(client.state, "open");
    assert.equal(ws.made.length, 1);
    await assert.rejects(client.get("tsk_missing"), { code: "not_found" }); // and it still answers
  } finally {
    client.close();
  }
});
