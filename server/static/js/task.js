// One task's page: its steps as a timeline, its output, its questions (answered with a
// click), cancel and retry, its input and result, and every event it had.
//
// Sections are rebuilt only when what they show changed (a signature per section), so a
// button under the pointer is not replaced by an unrelated update.

import { age, badge, clock, duration, h, json, progressBar, RETRYABLE, seconds, setProgress, TERMINAL, toast } from "./dom.js";

export class TaskPage {
  constructor(client, store, id) {
    this.client = client;
    this.store = store;
    this.id = id;
    this.missing = false;
    store.watch(id);
    this.sections = {
      head: h("header.card.task-head"),
      questions: h("div.questions"),
      steps: h("ol.timeline", { "aria-label": "Steps" }),
      output: h("pre.log", { tabindex: 0, "aria-label": "Output" }),
      details: h("div.details"),
      activity: h("ol.activity", { "aria-label": "Events" }),
    };
    const s = this.sections;
    this.el = h("section.page.task-page", { "data-task-id": id },
      h("a.back", { href: "#/" }, "← All tasks"),
      s.head, s.questions,
      h("div.task-grid", {},
        h("div.column", {},
          h("section.card.steps-card", {}, h("h2", {}, "Steps"), s.steps),
          h("section.card.details-card", {}, s.details)),
        h("div.column", {},
          h("section.card.output-card", {}, h("h2", {}, "Output"), s.output),
          h("section.card.activity-card", {},
            h("details", { open: window.innerWidth > 700 }, h("summary", {}, h("h2", {}, "Activity")), s.activity)))));
    this.load();
    this.render();
  }

  async load() {
    try {
      // The whole view, once: updates carry the compact one, without `input` (PROTOCOL.md).
      const whole = await this.client.get(this.id);
      this.input = whole.input;
      if (!this.store.putView(whole)) this.render();
      await this.fillHistory();
    } catch (err) {
      if (err.code === "not_found" || err.code === "forbidden") {
        this.missing = err.message;
        this.render();
      }
    }
  }

  /** The task's most recent events, page by page (live ones arrive meanwhile). */
  async fillHistory() {
    const view = this.store.tasks.get(this.id);
    let after = Math.max(0, (view ? view.version : 0) - 1000);
    for (;;) {
      const page = await this.client.history(this.id, { after, limit: 1000 });
      this.store.putHistory(this.id, page.events);
      if (!page.more || !page.events.length) return;
      after = page.events[page.events.length - 1].version;
    }
  }

  destroy() {
    this.store.unwatch(this.id);
  }

  update(ids) {
    if (ids.has(this.id)) this.render();
  }

  render() {
    const t = this.store.tasks.get(this.id);
    if (!t) {
      this.sections.head.replaceChildren(this.missing
        ? h("div.empty", {}, h("h1", {}, "Task not found"), h("p.muted", {}, this.missing))
        : h("p.muted", {}, "Loading…"));
      return;
    }
    document.title = `${t.kind} ${t.status} · taskcast`;
    this._patch("head", [t.status, t.step, t.attempt, t.cancel_requested, t.ended_at], () => this.head(t));
    setProgress(this.sections.head.querySelector(".progress"), t.progress, t.status);
    this._patch("questions", [t.status, t.questions], () => (t.questions || []).map((q) => this.question(t, q)));
    this._patch("steps", [t.steps, t.steps_total, t.status], () => steps(t));
    this._output(t.output_tail || [], TERMINAL.has(t.status));
    const input = t.input !== undefined ? t.input : this.input;
    this._patch("details", [input, t.result, t.error, t.labels, t.depends_on], () => details(t, input));
    const events = this.store.eventsOf(this.id);
    this._patch("activity", [events.length, events.length && events[events.length - 1].version],
      () => [...events.slice().reverse().map(activity),
        events.length && events[0].version > 1 ? h("li.earlier.muted", {}, `${events[0].version - 1} earlier events`) : null]);
  }

  _patch(name, key, build) {
    const el = this.sections[name];
    const sig = JSON.stringify(key);
    if (el.dataset.sig === sig) return;
    el.dataset.sig = sig;
    el.replaceChildren(...[build()].flat().filter(Boolean));
  }

  head(t) {
    const took = seconds(t.created_at, t.ended_at); // from creation: queueing and questions count
    const actions = [];
    if (!TERMINAL.has(t.status)) {
      actions.push(h("button.button.danger", { type: "button", "data-action": "cancel", disabled: !!t.cancel_requested,
        onclick: (ev) => this.command(ev.currentTarget, "cancel", () => this.client.cancel(t.id, { reason: "cancelled from the dashboard" })) },
      t.cancel_requested ? "Cancelling…" : "Cancel"));
    }
    if (RETRYABLE.has(t.status)) {
      actions.push(h("button.button.primary", { type: "button", "data-action": "retry",
        onclick: (ev) => this.command(ev.currentTarget, "retry", () => this.client.retry(t.id)) }, "Retry"));
    }
    return [
      h("div.title-row", {}, h("h1", {}, t.kind), badge(t.status), h("div.actions", {}, actions)),
      h("dl.meta", {},
        meta("Task", h("code", {}, t.id)),
        meta("Scope", t.scope),
        meta("Attempt", String(t.attempt || 1)),
        meta("Created", h("span", { "data-age": t.created_at, title: t.created_at }, age(t.created_at))),
        meta("Duration", h("span", TERMINAL.has(t.status) ? {} : { "data-elapsed": t.created_at }, duration(took)))),
      progressBar(t.progress, { status: t.status }),
    ];
  }

  question(t, q) {
    const busy = (on) => card.querySelectorAll("button, input").forEach((b) => { b.disabled = on; });
    const send = async (answer) => {
      busy(true);
      try {
        await this.client.answer(t.id, q.id, answer);
      } catch (err) {
        toast(`Could not answer: ${err.message}`);
        busy(false);
      }
    };
    const options = q.options && q.options.length
      ? q.options.map((o, i) => h(`button.button${i === 0 ? ".primary" : ""}`, { type: "button", "data-answer": String(o), onclick: () => send(o) }, String(o)))
      : [(() => {
        const input = h("input", { type: "text", placeholder: "Your answer", "aria-label": "Answer" });
        return h("form.answer-form", { onsubmit: (ev) => { ev.preventDefault(); send(input.value); } },
          input, h("button.button.primary", { type: "submit" }, "Send"));
      })()];
    const card = h("section.card.question", { "data-question": q.id },
      h("div.question-type", {}, (q.type || "question").replace(/_/g, " ")),
      h("p.prompt", {}, q.prompt || "The task is waiting for an answer."),
      h("div.options", {}, options));
    return card;
  }

  async command(button, name, send) {
    button.disabled = true;
    try {
      await send();
    } catch (err) {
      toast(`${name} failed: ${err.message}`);
      button.disabled = false;
    }
  }

  // The log keeps following the end unless the reader scrolled up.
  _output(lines, done) {
    const el = this.sections.output;
    const text = lines.join("\n") || (done ? "No output." : "No output yet.");
    if (el.dataset.text === text) return;
    const atEnd = el.scrollHeight - el.scrollTop - el.clientHeight < 24;
    el.dataset.text = text;
    el.textContent = text;
    el.classList.toggle("empty-log", !lines.length);
    if (atEnd) requestAnimationFrame(() => { el.scrollTop = el.scrollHeight; }); // once laid out
  }
}

function meta(label, value) {
  return h("div", {}, h("dt", {}, label), h("dd", {}, value));
}

function steps(t) {
  const items = (t.steps || []).map((s) => step(s, t));
  const total = t.steps_total || 0; // optional: how many steps were planned
  const pending = TERMINAL.has(t.status) ? 0 : total - items.length;
  const placeholder = (title) => h("li.step", { "data-status": "pending" }, h("span.marker", { "aria-hidden": "true" }),
    h("div.step-body", {}, h("div.step-line", {}, h("span.step-title.muted", {}, title), h("span.step-state", {}, "pending"))));
  // A long plan is summed up after the next two steps rather than listed to the end.
  const listed = pending > 3 ? 2 : pending;
  for (let i = 1; i <= listed; i++) items.push(placeholder(`Step ${items.length + 1} of ${total}`));
  if (pending > listed) items.push(placeholder(`${pending - listed} more steps`));
  if (!items.length) {
    return h("li.step.placeholder", {}, h("div.step-body", {}, h("p.muted", {},
      TERMINAL.has(t.status) ? "This task had no steps." : "No step has started yet.")));
  }
  return items;
}

function step(s, t) {
  const state = s.status === "running" && t.status === "waiting_answer" ? "waiting" : s.status;
  const took = s.ended_at ? duration(seconds(s.started_at, s.ended_at)) : null;
  return h("li.step", { "data-step": s.name, "data-status": s.status },
    h("span.marker", { "aria-hidden": "true" }),
    h("div.step-body", {},
      h("div.step-line", {},
        h("span.step-title", {}, s.name),
        h("span.step-state", {}, state, s.attempt > 1 ? ` · attempt ${s.attempt}` : ""),
        h("span.step-time", s.status === "running" ? { "data-elapsed": s.started_at } : {},
          took || (s.status === "running" ? duration(seconds(s.started_at)) : ""))),
      s.status === "running" ? progressBar(s.progress || 0, { status: "running" }) : null,
      s.message && s.status !== "failed" ? h("p.step-message", {}, s.message) : null,
      s.error ? h("p.step-error", {}, s.error) : null));
}

function details(t, input) {
  const parts = [];
  if (t.error) parts.push(h("h2", {}, "Error"), h("p.error-text", {}, t.error));
  if (t.result !== null && t.result !== undefined) parts.push(h("h2", {}, "Result"), h("pre.json", {}, json(t.result)));
  if (input !== undefined) parts.push(h("h2", {}, "Input"), h("pre.json", {}, json(input)));
  if (t.labels && t.labels.length) parts.push(h("h2", {}, "Labels"), h("p", {}, t.labels.map((l) => h("span.label", {}, l))));
  if (t.depends_on && t.depends_on.length) {
    parts.push(h("h2", {}, "Depends on"), h("p", {}, t.depends_on.map((d) => h("a.label", { href: `#/task/${d}` }, d))));
  }
  return parts.length ? parts : h("p.muted", {}, "No details.");
}

function activity(e) {
  const d = e.data || {};
  const what = d.step || d.question || d.error || d.reason || "";
  return h("li", { "data-version": e.version, "data-type": e.type },
    h("span.v", {}, `v${e.version}`),
    h("span.t", {}, clock(e.at)),
    h("span.e", { "data-kind": e.type.split(".")[0] }, e.type),
    h("span.what", {}, typeof what === "string" ? what : JSON.stringify(what)));
}
