// taskcast.js: the taskcast client, one ES module with no build step, written against
// PROTOCOL.md (v1) only. Every taskcast node serves it at /taskcast.js; taskcast.d.ts beside
// it declares its types.
//
//   import { connect } from "https://tasks.example.com/taskcast.js";
//   const tc = connect("https://tasks.example.com", { token });
//   tc.task("tsk_...").on("change", (view) => render(view));
//
// One websocket per client. After a drop (close 1001, 4408, 4429, 4500, or none at all) it
// reconnects with exponential backoff and full jitter; after 1009, 4401 and 4403 it stops
// (retrying unchanged cannot help) and says why. Across a reconnect, requests still
// unanswered are sent again (commands with the same idempotency key, so that is safe) and
// every subscription resumes after the last position it delivered. Each subscription hands
// its listener every version of each task once, in order: repeats are dropped, and a version
// gap is filled from the task's `history` before anything after it is delivered.

const SUBPROTOCOL = "taskcast.v1";
const RETRY_CLOSE = new Set([1001, 4408, 4429, 4500]); // and any drop without a close frame
const FINAL_CLOSE = new Set([1009, 4401, 4403]);
const TERMINAL = new Set(["completed", "failed", "cancelled", "timed_out"]);
const COMMANDS = new Set(["create", "cancel", "answer", "retry"]);
const HISTORY_PAGE = 1000; // the protocol's largest `history` page
const MAX_TRACKED = 10000; // tasks whose last version a subscription remembers
const DEFAULTS = { timeoutMs: 20000, backoffBaseMs: 500, backoffMaxMs: 15000, client: "taskcast.js/1" };

// Which state may follow which: anything else is a bug here, and throws.
const TRANSITIONS = {
  new: ["connecting", "closed"],
  connecting: ["open", "reconnecting", "closed"],
  open: ["reconnecting", "closed"],
  reconnecting: ["connecting", "closed"],
  closed: ["connecting"],
};

/** An error answered by the server (`code` is the protocol's) or raised here: `timeout` (a
 * request's deadline passed), `closed` (the client closed for good). */
export class TaskcastError extends Error {
  constructor(code, message, { retryable = false, key = undefined, closeCode = undefined } = {}) {
    super(message || code);
    this.name = "TaskcastError";
    this.code = code;
    this.retryable = retryable;
    if (key !== undefined) this.key = key; // a command's key: retrying with it is safe
    if (closeCode !== undefined) this.closeCode = closeCode;
  }
}

/** A client of the taskcast node at `url` (ws(s):// of `/ws`, or the node's http(s):// base
 * URL; by default the node that served this module). It connects at once. */
export function connect(url, options = {}) {
  return new Client(wsUrl(url), options);
}

function wsUrl(url) {
  const base = url === undefined || url === null ? new URL("/ws", import.meta.url) : new URL(url, import.meta.url);
  if (base.protocol === "http:") base.protocol = "ws:";
  else if (base.protocol === "https:") base.protocol = "wss:";
  if (base.protocol !== "ws:" && base.protocol !== "wss:") throw new TypeError(`not a taskcast URL: ${url}`);
  if (base.pathname === "/") base.pathname = "/ws";
  return base.href;
}

/** A fresh idempotency key (crypto.randomUUID needs a secure context; getRandomValues not). */
export function newKey() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

export class Client {
  constructor(url, options) {
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    this.token = this.options.token || null;
    this.WebSocket = this.options.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) throw new TypeError("no WebSocket here: pass one as connect(url, { WebSocket })");
    this.state = "new";
    this.attempt = 0; // reconnects since the last welcome
    this.closeCode = null; // why the last socket ended
    this.closeReason = "";
    this.retryAt = 0; // while reconnecting: when the next attempt starts (ms since epoch)
    this.welcome = null; // the last welcome: session, node, heartbeat_s, limits
    this.ws = null;
    this.socketNo = 0; // which socket is current: events of older ones are ignored
    this.nextId = 1;
    this.pending = new Map(); // id -> request awaiting its answer, kept across reconnects
    this.subs = new Map(); // channel -> Subscription
    this.views = new Map(); // task id -> open TaskView
    this.timer = null; // the next attempt, or the welcome's deadline
    this.keepalive = null;
    this.lastSent = 0;
    this.lastReceived = 0;
    // Connected once the caller's code has run: its subscriptions go in the first socket's
    // batch, and its onState may use what it defines after connect().
    queueMicrotask(() => this.state === "new" && this._open());
  }

  // connection

  _setState(state) {
    if (!TRANSITIONS[this.state].includes(state)) throw new Error(`taskcast: ${this.state} -> ${state}`);
    this.state = state;
    const onState = this.options.onState;
    if (onState) {
      onState({ state, attempt: this.attempt, code: this.closeCode, reason: this.closeReason, retryAt: this.retryAt });
    }
  }

  _open() {
    clearTimeout(this.timer);
    this.retryAt = 0;
    this._setState("connecting");
    const socketNo = ++this.socketNo;
    let ws;
    try {
      ws = new this.WebSocket(this.url, [SUBPROTOCOL]);
    } catch (err) {
      this._dropped(null, String(err));
      return;
    }
    this.ws = ws;
    const mine = () => socketNo === this.socketNo;
    ws.onopen = () => {
      if (!mine()) return;
      const hello = { type: "hello", id: "hello", client: this.options.client };
      if (this.token) hello.token = this.token;
      this._send(hello);
    };
    ws.onmessage = (msg) => {
      if (!mine()) return;
      this.lastReceived = Date.now();
      let frame;
      try {
        frame = JSON.parse(msg.data);
      } catch {
        return; // not JSON: nothing the protocol sends
      }
      if (frame && typeof frame === "object") this._dispatch(frame);
    };
    ws.onclose = (ev) => {
      if (mine()) this._dropped(ev.code, ev.reason);
    };
    // A socket that is not welcomed in time (a server that never answers) is given up.
    this.timer = setTimeout(() => mine() && this._abandon("no welcome in time"), this.options.timeoutMs);
  }

  // Leave the current socket: its events are ignored from now on.
  _leave() {
    const ws = this.ws;
    this.socketNo++;
    this.ws = null;
    clearInterval(this.keepalive);
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        // a socket still connecting may refuse: it is left either way
      }
    }
  }

  // Leave the current socket and go on as after a drop (reconnect).
  _abandon(reason) {
    this._leave();
    this._dropped(null, reason);
  }

  _welcome(frame) {
    clearTimeout(this.timer);
    this.welcome = frame;
    this.attempt = 0;
    this.closeCode = null;
    this.closeReason = "";
    this._setState("open");
    // Subscriptions first (each resumes where it stopped), then requests still unanswered.
    for (const sub of this.subs.values()) sub._subscribe();
    for (const [id, req] of this.pending) if (req.socketNo !== this.socketNo) this._sendRequest(id, req);
    const heartbeatMs = (frame.heartbeat_s || 25) * 1000;
    clearInterval(this.keepalive);
    this.keepalive = setInterval(() => this._beat(heartbeatMs), Math.min(heartbeatMs / 4, 10000));
  }

  // A client silent for 2 x heartbeat_s is closed (4408): ping when we have said nothing for
  // half of one. A server silent for longer than that (it pings when idle) is gone.
  _beat(heartbeatMs) {
    const now = Date.now();
    if (now - this.lastSent >= heartbeatMs / 2) this._send({ type: "ping", id: `ping-${this.nextId++}` });
    if (now - this.lastReceived > heartbeatMs * 2.5) this._abandon("server silent");
  }

  _dropped(code, reason) {
    clearTimeout(this.timer);
    clearInterval(this.keepalive);
    this.ws = null;
    this.closeCode = code;
    this.closeReason = reason || "";
    for (const sub of this.subs.values()) sub._detached();
    for (const [id, req] of this.pending) {
      if (!req.resend) this._settle(id, req, null, new TaskcastError("unavailable", "connection lost"));
    }
    if (this.state === "closed") return;
    if (FINAL_CLOSE.has(code)) {
      this._final(new TaskcastError("closed", `closed with ${code}${reason ? `: ${reason}` : ""}`, { closeCode: code }));
      return;
    }
    // RETRY_CLOSE, a drop without a close frame (1005, 1006) and anything unknown: try again.
    this.attempt += 1;
    const cap = Math.min(this.options.backoffMaxMs, this.options.backoffBaseMs * 2 ** this.attempt);
    const delay = Math.random() * cap; // full jitter
    this.retryAt = Date.now() + delay;
    this._setState("reconnecting");
    this.timer = setTimeout(() => this._open(), delay);
  }

  // Closed for good: every request still waiting fails with `error`.
  _final(error) {
    clearTimeout(this.timer);
    this._setState("closed");
    for (const [id, req] of this.pending) this._settle(id, req, null, error);
  }

  _settle(id, req, answer, error) {
    this.pending.delete(id);
    clearTimeout(req.deadline);
    if (error) req.reject(error);
    else req.resolve(answer);
  }

  /** Try again now instead of at `retryAt` (while reconnecting). */
  retryNow() {
    if (this.state === "reconnecting") this._open();
  }

  /** Use `token` from now on: on an open socket through `refresh` (its result), otherwise by
   * connecting again at once (after a 4401, a new token is what may change the answer). */
  setToken(token) {
    this.token = token || null;
    if (this.state === "open") return this.request({ type: "refresh", token });
    if (this.state === "reconnecting" || this.state === "closed") this._open();
    return Promise.resolve(null);
  }

  /** Close for good (code 1000): pending requests fail with `closed`. */
  close() {
    if (this.state === "closed") return;
    this.closeCode = 1000;
    this.closeReason = "closed by the client";
    this._leave();
    this._final(new TaskcastError("closed", "the client was closed", { closeCode: 1000 }));
  }

  _send(frame) {
    if (!this.ws || this.ws.readyState !== 1) return false; // 1: OPEN
    this.ws.send(JSON.stringify(frame));
    this.lastSent = Date.now();
    return true;
  }

  _sendRequest(id, req) {
    req.socketNo = this.socketNo;
    this._send({ ...req.frame, id });
  }

  _dispatch(frame) {
    switch (frame.type) {
      case "update":
      case "resync": {
        const sub = this.subs.get(frame.channel);
        if (sub) frame.type === "update" ? sub._update(frame) : sub._resync(frame);
        return;
      }
      case "ping":
        this._send({ type: "pong", id: frame.id });
        return;
      case "welcome":
        if (frame.id === "hello" && this.state === "connecting") this._welcome(frame);
        return;
    }
    if (frame.id === "hello" && frame.type === "error") {
      // A hello the server refuses (a malformed token): retrying unchanged cannot help.
      this._leave();
      this.closeReason = frame.message || frame.code;
      this._final(new TaskcastError(frame.code, frame.message));
      return;
    }
    const req = this.pending.get(frame.id);
    if (!req) return;
    const error = frame.type === "error"
      ? new TaskcastError(frame.code, frame.message, { retryable: !!frame.retryable, key: req.frame.key })
      : null;
    this._settle(frame.id, req, frame, error);
  }

  // requests

  /** Send any request frame; a promise of the frame answering it. It is sent again after a
   * reconnect until answered (unless `resend` is false: then it fails with `unavailable`),
   * and fails with `timeout` after `timeoutMs`. */
  request(frame, { timeoutMs = this.options.timeoutMs, resend = true } = {}) {
    if (this.state === "closed") return Promise.reject(new TaskcastError("closed", "the client is closed"));
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      const req = { frame, resolve, reject, resend, socketNo: 0 };
      req.deadline = setTimeout(() => this._settle(id, req, null, new TaskcastError("timeout",
        `no answer to ${frame.type} within ${timeoutMs} ms`, { retryable: true, key: frame.key })), timeoutMs);
      this.pending.set(id, req);
      if (this.state === "open") this._sendRequest(id, req);
    });
  }

  _command(frame, opts = {}) {
    if (!COMMANDS.has(frame.type)) throw new TypeError(`not a command: ${frame.type}`);
    return this.request({ ...frame, key: opts.key || newKey() }, opts);
  }

  async _query(frame, opts) {
    return (await this.request(frame, opts)).data;
  }

  /** Create a task: `{kind, scope, input, labels?, depends_on?, timeout_s?, priority?}`. */
  create(fields, opts) {
    return this._command({ ...fields, type: "create" }, opts);
  }

  cancel(task, opts = {}) {
    return this._command(withOptional({ type: "cancel", task }, { reason: opts.reason }), opts);
  }

  answer(task, question, answer, opts) {
    return this._command({ type: "answer", task, question, answer }, opts);
  }

  retry(task, opts) {
    return this._command({ type: "retry", task }, opts);
  }

  /** The whole view of a task. */
  get(task, opts) {
    return this._query({ type: "get", task }, opts);
  }

  /** `{tasks, cursor, position}` for filters `{scope?, status?, kind?, label?, limit?, cursor?}`. */
  list(filters = {}, opts) {
    return this._query({ ...filters, type: "list" }, opts);
  }

  /** `{events, more}`: a task's events after version `after`. */
  history(task, opts = {}) {
    return this._query(withOptional({ type: "history", task }, { after: opts.after, limit: opts.limit }), opts);
  }

  // subscriptions

  /** Follow `channel` (`task:<id>`, `scope:<scope>`, `all`): `onUpdate({channel, position,
   * event, task})` gets each version of each task once, in order. Options: `since` (resume
   * after that position), `snapshot` (the channel's current views first, to `onSnapshot`),
   * `onSnapshot(views)`, `onError(err)` (the subscription was refused, and ended). One
   * subscription per channel: a second replaces the first. */
  subscribe(channel, options = {}, onUpdate = () => {}) {
    const old = this.subs.get(channel);
    if (old) old._end();
    const sub = new Subscription(this, channel, options, onUpdate);
    this.subs.set(channel, sub);
    if (this.state === "open") sub._subscribe();
    return sub;
  }

  /** A live view of one task (see TaskView); the same object while it is open. */
  task(id, options = {}) {
    const known = this.views.get(id);
    if (known && !known.closed) return known;
    const view = new TaskView(this, id, options);
    this.views.set(id, view);
    return view;
  }
}

function withOptional(frame, optional) {
  for (const [k, v] of Object.entries(optional)) if (v !== undefined && v !== null) frame[k] = v;
  return frame;
}

/** One channel's subscription: resumed after every reconnect (and every `resync`) after
 * the last position it delivered; versions checked per task. */
export class Subscription {
  constructor(client, channel, { since = null, snapshot = false, onSnapshot = () => {}, onError = () => {} }, onUpdate) {
    this.client = client;
    this.channel = channel;
    this.position = since; // everything up to here was delivered (or is held, below)
    this.snapshot = snapshot;
    this.onUpdate = onUpdate;
    this.onSnapshot = onSnapshot;
    this.onError = onError;
    this.closed = false;
    this.subscribing = false; // a subscribe is in flight on this socket
    this.versions = new Map(); // task id -> the last version delivered (newest last)
    this.repairs = new Map(); // task id -> updates held while its gap is filled
  }

  /** Stop following the channel. */
  close() {
    if (this.closed) return;
    this._end();
    if (this.client.subs.get(this.channel) === this) {
      this.client.subs.delete(this.channel);
      if (this.client.state === "open") {
        this.client.request({ type: "unsubscribe", channel: this.channel }, { resend: false }).catch(() => {});
      }
    }
  }

  _end() {
    this.closed = true;
  }

  _detached() {
    this.subscribing = false;
  }

  _subscribe() {
    if (this.closed || this.subscribing) return;
    this.subscribing = true;
    const frame = { type: "subscribe", channel: this.channel };
    if (this.position) frame.since = this.position;
    else if (this.snapshot) frame.snapshot = true;
    this.client.request(frame, { resend: false }).then((answer) => this._subscribed(answer), (err) => {
      if (this.closed || err.code === "unavailable" || err.code === "closed") return; // redone at the next welcome
      if (err.code === "timeout") {
        this.client._abandon("no answer to subscribe"); // an unhealthy socket: start again
        return;
      }
      // Refused (not found, forbidden, ...): the subscription ends.
      this._end();
      if (this.client.subs.get(this.channel) === this) this.client.subs.delete(this.channel);
      this.onError(err);
    });
  }

  _subscribed(answer) {
    this.subscribing = false;
    if (this.closed) return;
    const resumed = answer.recovered && this.position;
    if (!resumed) this.position = answer.position || this.position;
    // Views stand for what happened before `position`: a new task's view is where it starts;
    // a known task whose view is ahead (a resume the server could not serve exactly) has its
    // missing versions filled from history, ending on that view.
    const fresh = [];
    for (const view of answer.tasks || []) {
      const known = this.versions.get(view.id);
      if (known === undefined) {
        this._delivered(view.id, view.version);
        fresh.push(view);
      } else if (view.version > known && !this.repairs.has(view.id)) {
        this.repairs.set(view.id, []);
        this._repair(view.id, known, view.version, view);
      }
    }
    if (fresh.length || !resumed) this.onSnapshot(fresh);
  }

  _update(frame) {
    if (this.closed) return;
    this.position = frame.position; // updates arrive in log order
    const id = frame.event.task;
    const held = this.repairs.get(id);
    if (held) {
      held.push(frame);
      return;
    }
    const known = this.versions.get(id);
    const version = frame.event.version;
    if (known !== undefined && version <= known) return; // a repeat (a resume's overlap)
    if (known !== undefined && version > known + 1) {
      this.repairs.set(id, [frame]);
      this._repair(id, known, version - 1, null);
      return;
    }
    this._deliver(frame);
  }

  _resync(frame) {
    // The server stopped this subscription to keep it gap-free: subscribe again after the
    // last position delivered (ours; the frame's when we have none).
    if (this.closed) return;
    this.position = this.position || frame.position;
    this.subscribing = false;
    this._subscribe();
  }

  _deliver(frame) {
    this._delivered(frame.event.task, frame.event.version);
    this.onUpdate(frame);
  }

  _delivered(id, version) {
    this.versions.delete(id); // re-inserted: the map's order is least recently updated first
    this.versions.set(id, version);
    if (this.versions.size > MAX_TRACKED) this.versions.delete(this.versions.keys().next().value);
  }

  // Versions (from, until] of task `id` from its history, delivered in order (the last with
  // `view`, when given), then the updates held meanwhile. What history no longer has (its
  // retention passed) is skipped: the next version known is delivered.
  async _repair(id, from, until, view) {
    let after = from;
    try {
      while (after < until && !this.closed) {
        const page = await this.client.history(id, { after, limit: HISTORY_PAGE });
        for (const event of page.events) {
          if (event.version <= after || event.version > until || this.closed) continue;
          after = event.version;
          this._deliver({ channel: this.channel, position: null, event,
            task: view && event.version === view.version ? view : null, repaired: true });
        }
        if (!page.more || !page.events.length) break;
      }
    } catch (err) {
      if (err.code === "closed") return;
      // Not repairable now (not found, or a deadline): what is held is delivered as it is.
    }
    const held = this.repairs.get(id) || [];
    this.repairs.delete(id);
    if (this.closed) return;
    if (view && (this.versions.get(id) ?? 0) < view.version) this._delivered(id, view.version);
    for (const frame of held) {
      const known = this.versions.get(id);
      if (known === undefined || frame.event.version > known) this._deliver(frame);
    }
  }
}

/** A live view of one task: `view` (its latest view, or null before the first), `done` (its
 * status is terminal: a retry may change that), `closed` (stopped, or the task was not
 * found: `error` says why). Events: `change` (view, update: the update that made it, absent
 * for the first view), `done` (view), `error` (err). */
export class TaskView {
  constructor(client, id, { since = null } = {}) {
    this.client = client;
    this.id = id;
    this.view = null;
    this.done = false;
    this.closed = false;
    this.error = null;
    this.listeners = { change: new Set(), done: new Set(), error: new Set() };
    this.sub = client.subscribe(`task:${id}`, {
      since,
      snapshot: !since,
      onSnapshot: (views) => views.forEach((v) => this._show(v)),
      onError: (err) => {
        this.error = err;
        this._stop();
        this._emit("error", err);
      },
    }, (update) => this._show(update.task, update));
  }

  /** Listen: `on("change", (view, update) => ...)`; returns a function that stops it. */
  on(event, listener) {
    this.listeners[event].add(listener);
    return () => this.listeners[event].delete(listener);
  }

  close() {
    this.sub.close();
    this._stop();
  }

  _stop() {
    this.closed = true;
    if (this.client.views.get(this.id) === this) this.client.views.delete(this.id);
  }

  _show(view, update) {
    if (view) this.view = view; // a version repaired from history carries no view
    const wasDone = this.done;
    this.done = !!this.view && TERMINAL.has(this.view.status);
    this._emit("change", this.view, update);
    if (this.done && !wasDone) this._emit("done", this.view);
  }

  _emit(event, ...args) {
    for (const listener of this.listeners[event]) listener(...args);
  }
}
