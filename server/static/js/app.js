// The dashboard: one taskcast.js client, one `all` subscription feeding the store, and three
// pages chosen by the hash: #/ (tasks), #/task/<id>, #/new.

import { connect } from "../taskcast.js";
import { CreatePage } from "./create.js";
import { age, duration, h, seconds, toast } from "./dom.js";
import { ListPage } from "./list.js";
import { Store } from "./store.js";
import { TaskPage } from "./task.js";

const TOKEN_KEY = "taskcast.token";
// Final closes the dashboard names; any other is a plain "closed".
const FINAL = { 4401: "unauthorized", 4403: "forbidden", 1009: "too_large" };

const store = new Store();
const main = document.getElementById("app");
let page = null;
let connState = { state: "connecting" }; // what onState said last (the header shows it)
const client = connect(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`, {
  token: localStorage.getItem(TOKEN_KEY),
  client: "taskcast-dashboard/1",
  onState: (state) => {
    connState = state;
    showState();
  },
});

// Live from the first paint: the snapshot of every task, then each update after it, every
// version once and in order, across reconnects (taskcast.js resumes and repairs).
client.subscribe("all", {
  snapshot: true,
  onSnapshot: (views) => {
    for (const view of views) store.putView(view);
    document.body.dataset.loaded = "true";
  },
}, (update) => store.applyUpdate(update));
store.addEventListener("change", (ev) => page && page.update(ev.detail));

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  if (page) page.destroy && page.destroy();
  const task = path.match(/^\/task\/([^/]+)$/);
  if (task) page = new TaskPage(client, store, decodeURIComponent(task[1]));
  else if (path === "/new") page = new CreatePage(client);
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

// The client's state as the header names it.
function shown() {
  if (connState.state === "closed") return FINAL[connState.code] || "closed";
  return connState.state === "connecting" && connState.attempt ? "reconnecting" : connState.state;
}

function showState() {
  const state = shown();
  const detail = connState.code ? `closed (${connState.code})${connState.reason ? `: ${connState.reason}` : ""}` : "";
  pill.dataset.state = state;
  const wait = connState.retryAt > Date.now() ? duration((connState.retryAt - Date.now()) / 1000) : "";
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
  if (state === "reconnecting" && wait) pill.append(h("button.link", { type: "button", onclick: () => client.retryNow() }, "Retry now"));
  pill.title = detail || text;
  tokenBar.hidden = state !== "unauthorized";
  if (state === "unauthorized") {
    tokenBar.querySelector(".token-why").textContent = client.token
      ? "The server refused this token. Paste a valid one:"
      : "This server requires a token. Paste yours to connect:";
  }
}

tokenBar.querySelector("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const token = tokenBar.querySelector("input").value.trim();
  if (!token) return;
  localStorage.setItem(TOKEN_KEY, token);
  client.setToken(token).catch((err) => toast(`Token refused: ${err.message}`));
});

// Ages, running times and the reconnect countdown move on their own.
setInterval(() => {
  for (const el of document.querySelectorAll("[data-age]")) el.textContent = age(el.dataset.age);
  for (const el of document.querySelectorAll("[data-elapsed]")) el.textContent = duration(seconds(el.dataset.elapsed));
  if (connState.state === "reconnecting") showState();
}, 1000);

window.taskcast = { client, store }; // for the console (and tests)
route();
showState();
