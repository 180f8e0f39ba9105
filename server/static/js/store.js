// What the dashboard knows: the latest view of every task, and the events of the tasks whose
// page is open. Every view and event passes the version check here, so a resume that
// overlaps what was already delivered changes nothing and nothing is shown twice.

import { TERMINAL } from "./dom.js";

const MAX_TASKS = 2000; // past this, the tasks that ended longest ago are forgotten
const MAX_EVENTS = 2000; // per watched task: its most recent events

export class Store extends EventTarget {
  constructor() {
    super();
    this.tasks = new Map(); // id -> latest view
    this.events = new Map(); // id -> Map(version -> event), for watched tasks only
    this.changed = new Set();
    this.scheduled = false;
  }

  /** Record a view; false when it is not newer than the one known. */
  putView(view) {
    const known = this.tasks.get(view.id);
    if (known && known.version >= view.version) return false;
    this.tasks.set(view.id, view);
    this._changed(view.id);
    if (this.tasks.size > MAX_TASKS) this._forget();
    return true;
  }

  _forget() {
    const ended = [...this.tasks.values()]
      .filter((t) => TERMINAL.has(t.status) && !this.events.has(t.id))
      .sort((a, b) => (a.updated_at || "").localeCompare(b.updated_at || ""));
    for (const t of ended.slice(0, this.tasks.size - MAX_TASKS)) this.tasks.delete(t.id);
  }

  /** Record an update (its `task` view is null when taskcast.js filled it from history). */
  applyUpdate(update) {
    const { event, task } = update;
    const log = this.events.get(event.task);
    if (log && !log.has(event.version)) {
      log.set(event.version, event);
      trim(log);
      this._changed(event.task);
    }
    if (task) this.putView(task);
  }

  watch(id) {
    if (!this.events.has(id)) this.events.set(id, new Map());
  }

  unwatch(id) {
    this.events.delete(id);
  }

  /** Add events from a `history` page (the ones already known are skipped). */
  putHistory(id, events) {
    const log = this.events.get(id);
    if (!log) return;
    for (const event of events) if (!log.has(event.version)) log.set(event.version, event);
    trim(log);
    this._changed(id);
  }

  /** The watched task's events, in version order. */
  eventsOf(id) {
    const log = this.events.get(id);
    return log ? [...log.values()].sort((a, b) => a.version - b.version) : [];
  }

  // Listeners hear once per frame, with every task that changed since.
  _changed(id) {
    this.changed.add(id);
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => {
      this.scheduled = false;
      const ids = this.changed;
      this.changed = new Set();
      this.dispatchEvent(new CustomEvent("change", { detail: ids }));
    });
  }
}

function trim(log) {
  if (log.size <= MAX_EVENTS) return;
  const versions = [...log.keys()].sort((a, b) => a - b);
  for (const v of versions.slice(0, log.size - MAX_EVENTS)) log.delete(v);
}
