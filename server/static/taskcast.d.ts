// Types of taskcast.js (served beside it at /taskcast.js). The wire shapes are PROTOCOL.md's.

/** A log position: 32 lowercase hex digits the server gave out. */
export type Position = string;

export type Status =
  | "waiting" | "queued" | "running" | "waiting_answer" | "retrying"
  | "completed" | "failed" | "cancelled" | "timed_out";

export interface Step {
  name: string;
  status: "pending" | "running" | "completed" | "failed" | "cancelled" | "timed_out";
  attempt: number;
  started_at: string;
  ended_at?: string;
  progress: number;
  message?: string;
  error?: string;
  result?: unknown; // in `get`'s whole view only
}

export interface Question {
  id: string;
  type: string;
  prompt: string;
  options?: string[];
}

/** A task view: compact in updates, `list` and snapshots; whole (with `input`, `answers`
 * and step results) from `get`. */
export interface TaskViewData {
  id: string;
  kind: string;
  scope: string;
  status: Status;
  step: string | null;
  steps: Step[];
  steps_total?: number;
  steps_count?: number;
  progress: number;
  output_tail: string[];
  questions: Question[];
  result: unknown;
  result_truncated?: boolean;
  error: string | null;
  labels: string[];
  depends_on: string[];
  priority?: number;
  timeout_s?: number | null;
  attempt: number;
  cancel_requested?: boolean;
  created_at: string;
  updated_at: string;
  started_at?: string;
  ended_at?: string;
  deadline_from?: string;
  version: number;
  position: Position;
  input?: Record<string, unknown>;
  answers?: Record<string, unknown>;
  degraded?: boolean;
  truncated?: boolean;
}

export interface TaskEvent {
  task: string;
  version: number;
  type: string;
  at: string;
  data: Record<string, unknown>;
  degraded?: boolean;
}

/** One version of one task, as a subscription hands it over. */
export interface Update {
  channel: string;
  /** The event's log position; null when it was filled in from `history`. */
  position: Position | null;
  event: TaskEvent;
  /** The compact view after this event; null when it was filled in from `history` (the
   * view after the last such event is given when it is known). */
  task: TaskViewData | null;
  /** Filled in from `history` after a version gap. */
  repaired?: boolean;
}

export interface Ack {
  type: "ack";
  id: number;
  task: string;
  status: Status;
  position: Position;
  duplicate: boolean;
}

/** `closed`: the client closed for good; `timeout`: a request's deadline passed; the others
 * are the protocol's error codes. */
export type ErrorCode =
  | "bad_request" | "unauthorized" | "forbidden" | "not_found" | "conflict" | "rate_limited"
  | "too_large" | "unavailable" | "internal" | "timeout" | "closed";

export class TaskcastError extends Error {
  code: ErrorCode;
  retryable: boolean;
  /** A command's idempotency key: sending the command again with it is safe. */
  key?: string;
  /** With `closed`: the close code that ended the client (1000 after close()). */
  closeCode?: number;
}

/** `new` until the first socket opens (at the end of the current task); `closed` is for good
 * (after close(), or a close code the protocol says not to retry: 1009, 4401, 4403). */
export type State = "new" | "connecting" | "open" | "reconnecting" | "closed";

export interface StateChange {
  state: State;
  /** Reconnect attempts since the last welcome. */
  attempt: number;
  /** The close code (and reason) of the socket that ended last; null when none was given. */
  code: number | null;
  reason: string;
  /** While reconnecting: when the next attempt starts (ms since the epoch). */
  retryAt: number;
}

export interface ConnectOptions {
  /** Sent in `hello`; see setToken to change it. */
  token?: string | null;
  onState?: (change: StateChange) => void;
  /** `hello.client`, `name/version` (default `taskcast.js/1`). */
  client?: string;
  /** A WebSocket implementation (default: the global one). */
  WebSocket?: typeof WebSocket;
  /** Every request's deadline, and the welcome's (default 20000). */
  timeoutMs?: number;
  /** Reconnects wait a random time in [0, min(backoffMaxMs, backoffBaseMs × 2^attempt)). */
  backoffBaseMs?: number;
  backoffMaxMs?: number;
}

export interface RequestOptions {
  timeoutMs?: number;
}

export interface CommandOptions extends RequestOptions {
  /** The idempotency key (default: a new UUID, kept when the command is sent again). */
  key?: string;
}

export interface CreateFields {
  kind: string;
  scope: string;
  input: Record<string, unknown>;
  labels?: string[];
  depends_on?: string[];
  timeout_s?: number;
  priority?: number;
  subscribe?: boolean;
}

export interface ListFilters {
  scope?: string;
  status?: Status[];
  kind?: string;
  label?: string;
  limit?: number;
  cursor?: string;
}

export interface SubscribeOptions {
  /** Resume after this position (one a subscription or an ack gave out). */
  since?: Position | null;
  /** Start with the channel's current views (to onSnapshot), then live updates. */
  snapshot?: boolean;
  /** Views of tasks the subscription had not seen, each where its updates start. */
  onSnapshot?: (views: TaskViewData[]) => void;
  /** The server refused the subscription (e.g. `not_found`); it has ended. */
  onError?: (error: TaskcastError) => void;
}

export class Subscription {
  readonly channel: string;
  /** Everything up to here was handed over: persist it to resume with `since` later. */
  readonly position: Position | null;
  readonly closed: boolean;
  close(): void;
}

/** A live view of one task. */
export class TaskView {
  readonly id: string;
  /** Its latest view; null before the first. */
  readonly view: TaskViewData | null;
  /** Its status is terminal (a `retry` may run it again). */
  readonly done: boolean;
  /** Closed, or refused (then `error` says why). */
  readonly closed: boolean;
  readonly error: TaskcastError | null;
  on(event: "change", listener: (view: TaskViewData, update?: Update) => void): () => void;
  on(event: "done", listener: (view: TaskViewData) => void): () => void;
  on(event: "error", listener: (error: TaskcastError) => void): () => void;
  close(): void;
}

export class Client {
  readonly url: string;
  readonly state: State;
  readonly token: string | null;
  /** The last `welcome` (session, node, heartbeat_s, limits). */
  readonly welcome: Record<string, unknown> | null;

  create(fields: CreateFields, options?: CommandOptions): Promise<Ack>;
  cancel(task: string, options?: CommandOptions & { reason?: string }): Promise<Ack>;
  answer(task: string, question: string, answer: unknown, options?: CommandOptions): Promise<Ack>;
  retry(task: string, options?: CommandOptions): Promise<Ack>;
  get(task: string, options?: RequestOptions): Promise<TaskViewData>;
  list(filters?: ListFilters, options?: RequestOptions):
    Promise<{ tasks: TaskViewData[]; cursor: string | null; position: Position }>;
  history(task: string, options?: RequestOptions & { after?: number; limit?: number }):
    Promise<{ events: TaskEvent[]; more: boolean }>;
  /** Any request frame; the frame answering it. */
  request(frame: Record<string, unknown>, options?: RequestOptions & { resend?: boolean }):
    Promise<Record<string, unknown>>;

  /** Every version of each task of `channel` (`task:<id>`, `scope:<scope>`, `all`) once, in
   * order, across reconnects. One subscription per channel: a second replaces the first. */
  subscribe(channel: string, options?: SubscribeOptions, onUpdate?: (update: Update) => void): Subscription;
  /** A live view of task `id` (from its current view; or after `since`). */
  task(id: string, options?: { since?: Position | null }): TaskView;

  /** Use `token` from now on (on an open socket through `refresh`). */
  setToken(token: string | null): Promise<unknown>;
  /** While reconnecting: try now. */
  retryNow(): void;
  close(): void;
}

/** A client of the node at `url` (ws(s):// of /ws, or the node's http(s):// address; by
 * default the node that served this module). */
export function connect(url?: string | null, options?: ConnectOptions): Client;

/** A fresh idempotency key (a UUID). */
export function newKey(): string;
