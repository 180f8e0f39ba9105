// The dashboard: one connection, one `all` subscription feeding the store, and three pages
// chosen by the hash: #/ (tasks), #/task/<id>, #/new.

import { Connection } from "./connection.js";
import { CreatePage } from "./create.js";
import { age, duration, h, seconds } from "./dom.js";
import { ListPage } from "./list.js";
import { Store } from "./store.js";
import { TaskPage } from "./task.js";

const TOKEN_KEY = "taskcast.token";
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;

const conn = new Connection(wsUrl, { token: localStorage.getItem(TOKEN_KEY) });
const store = new Store();
const main = document.getElementById("app");
let page = null;

// Live from the first paint: the snapshot of every task, then each update after it. On a
// resume the subscription continues from its last position (connection.js); when the
// server could not (`recovered: false`), its current views come instead, and the open
// task's events are read again from its history.
conn.subscribe("all", {
  snapshot: true,
  onUpdate: (frame) => store.applyUpdate(frame),
  onSubscribed: (answer) => {
    for (const view of answer.tasks || []) store.putView(view);
    if (answer.recovered === false && page instanceof TaskPage) page.fillHistory().catch(() => {});
    document.body.dataset.loaded = "true";
  },
});
store.addEventListener("change", (ev) => page && page.update(ev.detail));

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  if (page) page.destroy && page.destroy();
  const task = path.match(/^\/task\/([^/]+)$/);
  if (task) page = new TaskPage(conn, store, decodeURIComponent(task[1]));
  else if (path === "/new") page = new CreatePage(conn);
  else page = new ListPage(store, new URLSearchParams(query || ""));
  if (!task) document.title = "taskcast";
  main.replaceChildren(page.el);
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.getAttribute("href") === (path === "/new" ? "#/new" : "#/") && !task);
  }
  window.scrollTo(0, 0);
}
window.addEventListener("hashchange", route);

// Connection state, always visible in the header.
const pill = document.getElementById("conn");
const tokenBar = document.getElementById("token-bar");

function showState() {
  const { state, detail } = conn;
  pill.dataset.state = state;
  const wait = conn.retryAt > Date.now() ? duration((conn.retryAt - Date.now()) / 1000) : "";
  const text = {
    connecting: "Connecting…",
    open: "Live",
    reconnecting: wait ? `Reconnecting in ${wait}` : "Reconnecting…",
    unauthorized: "Token required",
    forbidden: "Access denied",
    too_large: "Disconnected",
    closed: "Closed",
  }[state] || state;
  pill.replaceChildren(h("span.dot", { "aria-hidden": "true" }), h("span.state-text", {}, text));
  if (state === "reconnecting" && wait) pill.append(h("button.link", { type: "button", onclick: () => conn.retryNow() }, "Retry now"));
  pill.title = detail || text;
  tokenBar.hidden = state !== "unauthorized";
  if (state === "unauthorized") {
    tokenBar.querySelector(".token-why").textContent = conn.token
      ? "The server refused this token. Paste a valid one:"
      : "This server requires a token. Paste yours to connect:";
  }
}
conn.addEventListener("state", showState);

tokenBar.querySelector("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const token = tokenBar.querySelector("input").value.trim();
  if (!token) return;
  localStorage.setItem(TOKEN_KEY, token);
  conn.setToken(token);
});

// Ages, running times and the reconnect countdown move on their own.
setInterval(() => {
  for (const el of document.querySelectorAll("[data-age]")) el.textContent = age(el.dataset.age);
  for (const el of document.querySelectorAll("[data-elapsed]")) el.textContent = duration(seconds(el.dataset.elapsed));
  if (conn.state === "reconnecting") showState();
}, 1000);

window.taskcast = { conn, store }; // for the console (and tests)
route();
showState();
conn.start();
