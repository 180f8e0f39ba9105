// The websocket to taskcast (PROTOCOL.md, v1): hello, requests answered by id, and
// subscriptions that survive reconnects.
//
// After a drop (close 1001, 4408, 4429, 4500, or none at all) it reconnects with exponential
// backoff and full jitter, then resumes every subscription with `since` = the last position
// it received, so nothing is missed; commands carry an idempotency `key` and are sent again
// if their ack was lost. After 4401 it waits for a token (`state === "unauthorized"`); after
// 4403 and 1009 it stops: retrying unchanged cannot help.

const SUBPROTOCOL = "taskcast.v1";
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 15000;
const FINAL = { 4401: "unauthorized", 4403: "forbidden", 1009: "too_large" };

export class RequestError extends Error {
  constructor(frame) {
    super(frame.message || frame.code);
    this.code = frame.code;
    this.retryable = !!frame.retryable;
  }
}

function randomKey() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(36).slice(2)}`;
}

export class Connection extends EventTarget {
  constructor(url, { token = null, client = "taskcast-dashboard/1" } = {}) {
    super();
    this.url = url;
    this.token = token;
    this.client = client;
    this.state = "connecting"; // connecting | open | reconnecting | unauthorized | forbidden | closed
    this.detail = "";
    this.retryAt = 0; // when reconnecting: the time of the next attempt (ms since epoch)
    this.attempt = 0;
    this.heartbeatMs = 25000;
    this.ws = null;
    this.socketNo = 0; // counts sockets: what was sent on which one
    this.nextId = 1;
    this.pending = new Map(); // id -> {frame, resolve, reject, resend, socketNo}
    this.subs = new Map(); // channel -> subscription
    this.timer = null;
    this.keepalive = null;
    this.lastSent = 0;
    this.lastReceived = 0;
  }

  start() {
    this._open();
  }

  setToken(token) {
    this.token = token || null;
    if (this.state !== "open") {
      clearTimeout(this.timer);
      this._open();
    }
  }

  retryNow() {
    if (this.state === "reconnecting") {
      clearTimeout(this.timer);
      this._open();
    }
  }

  _setState(state, detail = "") {
    this.state = state;
    this.detail = detail;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, detail } }));
  }

  _open() {
    this._setState(this.attempt ? "reconnecting" : "connecting", "connecting…");
    this.retryAt = 0;
    let ws;
    try {
      ws = new WebSocket(this.url, [SUBPROTOCOL]);
    } catch (err) {
      this._closed(null, String(err));
      return;
    }
    this.ws = ws;
    const socketNo = ++this.socketNo;
    ws.onopen = () => {
      const hello = { type: "hello", id: "hello", client: this.client };
      if (this.token) hello.token = this.token;
      this._send(hello);
    };
    ws.onmessage = (msg) => {
      if (socketNo !== this.socketNo) return;
      this.lastReceived = Date.now();
      let frame;
      try {
        frame = JSON.parse(msg.data);
      } catch {
        return;
      }
      this._dispatch(frame);
    };
    ws.onclose = (ev) => {
      if (socketNo !== this.socketNo) return;
      this._closed(ev.code, ev.reason);
    };
  }

  _welcome(frame) {
    this.heartbeatMs = (frame.heartbeat_s || 25) * 1000;
    this.attempt = 0;
    this._setState("open");
    // Subscriptions first (each resumes where it stopped), then requests still in flight.
    for (const sub of this.subs.values()) this._subscribeOnSocket(sub);
    for (const [id, p] of this.pending) {
      if (p.resend && p.socketNo !== this.socketNo) this._sendPending(id, p);
    }
    clearInterval(this.keepalive);
    this.keepalive = setInterval(() => this._beat(), Math.min(this.heartbeatMs / 2, 10000));
  }

  // A client silent for 2 x heartbeat_s is closed (4408): ping when we have said nothing.
  // A server silent for that long (it pings when idle) is gone: drop the socket, reconnect.
  _beat() {
    const now = Date.now();
    if (now - this.lastSent >= this.heartbeatMs / 2) this._send({ type: "ping", id: `ka-${this.nextId++}` });
    if (now - this.lastReceived > this.heartbeatMs * 2.5 && this.ws) this.ws.close(4000, "server silent");
  }

  _closed(code, reason) {
    clearInterval(this.keepalive);
    this.ws = null;
    for (const [id, p] of this.pending) {
      if (!p.resend) {
        // Subscribes are redone from their subscription's state; other one-shots just fail.
        this.pending.delete(id);
        p.reject(new RequestError({ code: "unavailable", message: "connection lost" }));
      }
    }
    const final = FINAL[code];
    if (final) {
      this._setState(final, reason || "");
      return;
    }
    if (this.state === "closed") return;
    this.attempt += 1;
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** this.attempt);
    const delay = Math.random() * cap; // full jitter
    this.retryAt = Date.now() + delay;
    this._setState("reconnecting", code ? `closed (${code})` : "connection lost");
    this.timer = setTimeout(() => this._open(), delay);
  }

  close() {
    this._setState("closed");
    clearTimeout(this.timer);
    clearInterval(this.keepalive);
    if (this.ws) this.ws.close(1000);
  }

  _send(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    this.lastSent = Date.now();
    return true;
  }

  _sendPending(id, p) {
    p.socketNo = this.socketNo;
    this._send({ ...p.frame, id });
  }

  _dispatch(frame) {
    switch (frame.type) {
      case "update": {
        const sub = this.subs.get(frame.channel);
        if (sub) {
          sub.position = frame.position; // updates arrive in log order
          sub.onUpdate(frame);
        }
        return;
      }
      case "resync": {
        const sub = this.subs.get(frame.channel);
        if (sub) {
          sub.position = frame.position || sub.position;
          this._subscribeOnSocket(sub);
        }
        return;
      }
      case "ping":
        this._send({ type: "pong", id: frame.id });
        return;
      case "pong":
        return;
      case "welcome":
        if (frame.id === "hello") this._welcome(frame);
        return;
    }
    const p = this.pending.get(frame.id);
    if (p) {
      this.pending.delete(frame.id);
      if (frame.type === "error") p.reject(new RequestError(frame));
      else p.resolve(frame);
    }
  }

  /** Send a request; a promise of its answer (rejected with RequestError on `error`). */
  request(frame, { resend = true } = {}) {
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      const p = { frame, resolve, reject, resend, socketNo: 0 };
      this.pending.set(id, p);
      if (this.state === "open") this._sendPending(id, p);
      else if (!resend) {
        this.pending.delete(id);
        reject(new RequestError({ code: "unavailable", message: "not connected" }));
      }
    });
  }

  /** A command: answered by its ack. The key makes a resend after a reconnect safe. */
  command(frame) {
    return this.request({ ...frame, key: frame.key || randomKey() });
  }

  /**
   * Subscribe to `channel`. `onUpdate(frame)` gets each update; `onSubscribed(answer)` each
   * `subscribed` answer (the first, and one per resume: its `tasks` are current views).
   */
  subscribe(channel, { since = null, snapshot = false, onUpdate, onSubscribed = () => {}, onError = () => {} }) {
    const sub = { channel, position: since, snapshot, onUpdate, onSubscribed, onError };
    this.subs.set(channel, sub);
    if (this.state === "open") this._subscribeOnSocket(sub);
    return {
      close: () => {
        if (this.subs.get(channel) === sub) {
          this.subs.delete(channel);
          if (this.state === "open") this.request({ type: "unsubscribe", channel }, { resend: false }).catch(() => {});
        }
      },
    };
  }

  _subscribeOnSocket(sub) {
    const frame = { type: "subscribe", channel: sub.channel };
    if (sub.position) frame.since = sub.position;
    else if (sub.snapshot) frame.snapshot = true;
    this.request(frame, { resend: false }).then(
      (answer) => {
        // Resumed (`recovered`): the stream continues after our own position. Otherwise
        // (new, or a resume the server could not serve) it starts at the answer's.
        if (!answer.recovered || !sub.position) sub.position = answer.position || sub.position;
        sub.onSubscribed(answer);
      },
      (err) => {
        if (err.code !== "unavailable") sub.onError(err);
      },
    );
  }
}
