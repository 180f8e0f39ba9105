// The task list: live from the first paint (the `all` subscription's snapshot, then its
// updates), filtered by scope, status and kind.

import { age, badge, h, progressBar, setProgress, statusLabel, STATUSES } from "./dom.js";

const FILTERS = ["scope", "status", "kind"];

export class ListPage {
  constructor(store, params) {
    this.store = store;
    this.filters = Object.fromEntries(FILTERS.map((f) => [f, params.get(f) || ""]));
    this.selects = {};
    this.rows = h("div.rows", { role: "rowgroup" });
    this.count = h("span.count", {}, "");
    this.el = h("section.page.list-page", {},
      h("div.page-head", {},
        h("h1", {}, "Tasks ", this.count),
        h("a.button.primary", { href: "#/new" }, "New task")),
      h("div.filters", { role: "search" }, FILTERS.map((f) => this._select(f))),
      h("div.task-table", { role: "table", "aria-label": "Tasks" },
        h("div.row.head", { role: "row" },
          ["Status", "Task", "Scope", "Current step", "Progress", "Age"].map((t) => h("span.cell", { role: "columnheader" }, t))),
        this.rows));
    this.render();
  }

  _select(name) {
    const select = h("select", { "data-filter": name, "aria-label": `Filter by ${name}`,
      onchange: () => {
        this.filters[name] = select.value;
        const query = new URLSearchParams(Object.entries(this.filters).filter(([, v]) => v));
        history.replaceState(null, "", `#/${query.toString() ? `?${query}` : ""}`);
        this.render();
      } });
    select.append(h("option", { value: "" }, "All"));
    if (name === "status") for (const s of STATUSES) select.append(h("option", { value: s }, statusLabel(s)));
    this.selects[name] = select;
    return h("label.filter", {}, h("span", {}, name), select);
  }

  // Options for scopes and kinds come from the tasks seen; new ones are appended, so a
  // select the user has open is never rebuilt under them.
  _options() {
    for (const name of ["scope", "kind"]) {
      const select = this.selects[name];
      const have = new Set([...select.options].map((o) => o.value));
      const values = new Set([...this.store.tasks.values()].map((t) => t[name]));
      if (this.filters[name]) values.add(this.filters[name]);
      for (const value of [...values].sort()) {
        if (!have.has(value)) select.append(h("option", { value }, value));
      }
      select.value = this.filters[name];
    }
    this.selects.status.value = this.filters.status;
  }

  render() {
    this._options();
    const all = [...this.store.tasks.values()];
    const shown = all
      .filter((t) => FILTERS.every((f) => !this.filters[f] || t[f] === this.filters[f]))
      .sort((a, b) => (b.created_at || "").localeCompare(a.created_at || "") || b.id.localeCompare(a.id));
    this.count.textContent = shown.length === all.length ? `${all.length}` : `${shown.length} of ${all.length}`;
    if (!shown.length) {
      const filtered = all.length > 0;
      this.rows.replaceChildren(h("div.empty", {},
        h("p", {}, filtered ? "No task matches these filters." : "No tasks yet."),
        filtered ? null : h("a.button.primary", { href: "#/new" }, "Create a task")));
      return;
    }
    // Rows are kept by task and patched in place, so a row being clicked is never replaced.
    const wanted = shown.map((t) => this._row(t));
    const current = [...this.rows.children];
    if (wanted.length !== current.length || wanted.some((el, i) => el !== current[i])) {
      this.rows.replaceChildren(...wanted);
    }
  }

  _row(t) {
    this.rowsById = this.rowsById || new Map();
    let el = this.rowsById.get(t.id);
    if (!el) {
      el = h("a.row.task-row", { role: "row", href: `#/task/${t.id}`, "data-task-id": t.id },
        h("span.cell.status", { role: "cell" }),
        h("span.cell.task", { role: "cell" }, h("strong.kind", {}, t.kind), h("code.id", {}, t.id)),
        h("span.cell.scope", { role: "cell" }, t.scope),
        h("span.cell.current", { role: "cell" }),
        h("span.cell.progress-cell", { role: "cell" }, progressBar(0)),
        h("span.cell.age", { role: "cell", "data-age": t.created_at, title: t.created_at }, age(t.created_at)));
      this.rowsById.set(t.id, el);
    }
    if (el.dataset.version === String(t.version)) return el;
    el.dataset.version = t.version;
    el.dataset.status = t.status;
    const [status, , , step, progress] = el.children;
    if (status.dataset.status !== t.status) {
      status.dataset.status = t.status;
      status.replaceChildren(badge(t.status));
    }
    const stepContent = currentStep(t);
    const stepKey = JSON.stringify([t.step, t.questions && t.questions.length, t.steps_total]);
    if (step.dataset.key !== stepKey) {
      step.dataset.key = stepKey;
      step.replaceChildren(...[stepContent].flat().filter(Boolean));
    }
    setProgress(progress.firstChild, t.progress, t.status);
    return el;
  }

  update() {
    this.render();
  }
}


function currentStep(t) {
  if (t.questions && t.questions.length) return h("span.asking", {}, "question waiting");
  if (!t.step) return h("span.muted", {}, "—");
  const total = t.steps_total; // optional: how many steps were planned
  const index = (t.steps || []).findIndex((s) => s.name === t.step) + 1;
  return [h("span.step-name", {}, t.step), total ? h("span.muted", {}, ` ${index}/${total}`) : null];
}
