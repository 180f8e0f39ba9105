// The form that creates a task of a built-in kind, with an example input for each.

import { h, toast } from "./dom.js";

// Example inputs, and what each kind does (their modules under events/kinds/ say more).
export const KINDS = {
  demo: { input: { steps: 5, step_ms: 800, ask_step: 3 },
    about: "N steps of M ms each. fail_step makes one fail once; ask_step asks for approval before that step." },
  provision: { input: { name: "demo" },
    about: "A named workspace with a running agent and a session. Asks for approval first unless approve is true." },
  "git.clone": { input: { url: "https://github.com/acme/api.git", dest: "repos/api" },
    about: "Clone url into dest (a path in the scope's workspace), with git's progress." },
  "repo.sync": { input: { repo: "repos/api" },
    about: "Fetch and fast-forward the checked-out branch (or branch) of a clone in the scope's workspace." },
  "repo.rebase_branch": { input: { repo: "repos/api", branch: "feature/login", onto: "main" },
    about: "Rebase branch onto another; a conflict aborts and names the files." },
  "repo.restack": { input: { repo: "repos/api", stack: ["feature/a", "feature/b"], base: "main" },
    about: "Rebase a stack of branches in order, each onto its parent's new tip." },
  "repo.register_branch": { input: { repo: "repos/api", branch: "feature/b", parent: "feature/a" },
    about: "Record a branch's parent, for repo.restack." },
  shell: { input: { command: ["echo", "hello"] },
    about: "Run one allow-listed command (TASKCAST_SHELL_ALLOW) and stream its output." },
};

const SCOPE_KEY = "taskcast.scope";

export class CreatePage {
  constructor(client) {
    this.client = client;
    const template = (kind) => JSON.stringify((KINDS[kind] || {}).input || {}, null, 2);
    this.about = h("p.help", {}, KINDS.demo.about);
    this.kind = h("select#kind", { name: "kind", required: true },
      Object.keys(KINDS).map((k) => h("option", { value: k }, k)));
    this.scope = h("input#scope", { name: "scope", required: true, autocomplete: "off", spellcheck: false });
    this.scope.value = localStorage.getItem(SCOPE_KEY) || "project:demo";
    this.input = h("textarea#input", { name: "input", rows: 8, spellcheck: false, "aria-describedby": "input-help" });
    this.input.value = template("demo");
    this.labels = h("input#labels", { name: "labels", placeholder: "e.g. nightly, team-a", autocomplete: "off" });
    this.timeout = h("input#timeout", { name: "timeout_s", type: "number", min: 1, step: "any", placeholder: "none" });
    this.error = h("p.form-error", { role: "alert" });
    this.submit = h("button.button.primary", { type: "submit" }, "Create task");
    let shown = template("demo");
    this.kind.addEventListener("change", () => {
      // Replace the example only when the user has not edited it.
      this.about.textContent = (KINDS[this.kind.value] || {}).about || "";
      if (this.input.value.trim() === shown.trim() || !this.input.value.trim()) {
        shown = template(this.kind.value);
        this.input.value = shown;
      }
    });
    this.el = h("section.page.create-page", {},
      h("a.back", { href: "#/" }, "← All tasks"),
      h("form.card.create-form", { onsubmit: (ev) => { ev.preventDefault(); this.create(); } },
        h("h1", {}, "New task"),
        h("div.field", {}, h("label", { for: "kind" }, "Kind"), this.kind, this.about),
        field("Scope", this.scope, "Who may see it: e.g. project:42 or repo:acme/api."),
        field("Input (JSON)", this.input, "A JSON object. Each kind comes with an example; edit it freely.", "input-help"),
        h("div.two", {}, field("Labels", this.labels), field("Timeout (s)", this.timeout)),
        this.error,
        h("div.form-actions", {}, this.submit, h("a.button", { href: "#/" }, "Cancel"))));
  }

  async create() {
    this.error.textContent = "";
    let input;
    try {
      input = JSON.parse(this.input.value || "{}");
      if (typeof input !== "object" || input === null || Array.isArray(input)) throw new Error("the input must be a JSON object");
    } catch (err) {
      this.error.textContent = `Input: ${err.message}`;
      this.input.focus();
      return;
    }
    const frame = { kind: this.kind.value, scope: this.scope.value.trim(), input };
    const labels = this.labels.value.split(",").map((l) => l.trim()).filter(Boolean);
    if (labels.length) frame.labels = labels;
    if (this.timeout.value) frame.timeout_s = Number(this.timeout.value);
    this.submit.disabled = true;
    this.submit.textContent = "Creating…";
    try {
      const ack = await this.client.create(frame);
      localStorage.setItem(SCOPE_KEY, frame.scope);
      toast(`Created ${frame.kind} task`, "ok");
      location.hash = `#/task/${ack.task}`;
    } catch (err) {
      this.error.textContent = err.message;
      this.submit.disabled = false;
      this.submit.textContent = "Create task";
    }
  }

  update() {}

  destroy() {}
}

function field(label, control, help, helpId) {
  return h("div.field", {},
    h("label", { for: control.id }, label),
    control,
    help ? h("p.help", helpId ? { id: helpId } : {}, help) : null);
}
