// Small DOM and formatting helpers.

/** h("div.card#main", {onclick}, child, [children]...) -> HTMLElement */
export function h(tag, attrs = {}, ...children) {
  const [name, ...rest] = tag.split(/(?=[.#])/);
  const el = document.createElement(name || "div");
  for (const part of rest) {
    if (part[0] === ".") el.classList.add(part.slice(1));
    else el.id = part.slice(1);
  }
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className += ` ${value}`;
    else if (key === "style" && typeof value === "object") Object.assign(el.style, value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

export const TERMINAL = new Set(["completed", "failed", "cancelled", "timed_out"]);
export const RETRYABLE = new Set(["failed", "cancelled", "timed_out"]);
export const STATUSES = ["waiting", "queued", "running", "waiting_answer", "retrying",
  "completed", "failed", "cancelled", "timed_out"];

export function statusLabel(status) {
  return status === "waiting_answer" ? "needs answer" : (status || "").replace("_", " ");
}

export function badge(status) {
  return h("span.badge", { "data-status": status }, statusLabel(status));
}

export function progressBar(value, { label = true, status = "" } = {}) {
  const pct = Math.round(Math.max(0, Math.min(1, value || 0)) * 100);
  return h("div.progress", { "data-status": status, role: "progressbar", "aria-valuenow": pct,
    "aria-valuemin": 0, "aria-valuemax": 100 },
  h("div.progress-track", {}, h("div.progress-fill", { style: { width: `${pct}%` } })),
  label ? h("span.progress-label", {}, `${pct}%`) : null);
}

/** Move an existing progress bar (in place: no element is replaced). */
export function setProgress(el, value, status = "") {
  const pct = Math.round(Math.max(0, Math.min(1, value || 0)) * 100);
  el.dataset.status = status;
  el.setAttribute("aria-valuenow", pct);
  el.querySelector(".progress-fill").style.width = `${pct}%`;
  const label = el.querySelector(".progress-label");
  if (label) label.textContent = `${pct}%`;
}

export function seconds(fromIso, toIso) {
  if (!fromIso) return null;
  const to = toIso ? Date.parse(toIso) : Date.now();
  return (to - Date.parse(fromIso)) / 1000;
}

export function duration(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "";
  if (s < 1) return `${Math.max(0, Math.round(s * 1000))} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${Math.floor(s % 60)}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

export function age(iso) {
  const s = seconds(iso);
  if (s === null) return "";
  if (s < 5) return "just now";
  if (s < 60) return `${Math.floor(s)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

export function clock(iso) {
  return iso ? new Date(iso).toLocaleTimeString([], { hour12: false }) : "";
}

export function json(value) {
  return JSON.stringify(value, null, 2);
}

/** A short-lived message at the bottom of the screen. */
export function toast(message, kind = "error") {
  let box = document.getElementById("toasts");
  if (!box) {
    box = h("div#toasts", { "aria-live": "polite" });
    document.body.append(box);
  }
  const item = h("div.toast", { "data-kind": kind }, message);
  box.append(item);
  setTimeout(() => item.remove(), 6000);
}
