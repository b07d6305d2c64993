// The Stele console: pages over the HTTP API, which it calls with the session's cookie (and its
// CSRF token for changes). Every text from the server is set as text, never as markup.
"use strict";

// `shown` counts the pages opened: an answer that comes back after another page was opened is
// for a page no longer on screen and is let go (it would otherwise draw that page over this one).
const state = { session: null, live: [], shown: 0 };

// ---- helpers ---------------------------------------------------------------------------------

// An element: h("a", { href: "#/x" }, "text", child, …). Strings become text nodes.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function status(text) {
  return h("span", { class: `status ${String(text).toLowerCase()}` }, text);
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

function short(id) {
  return id ? String(id).slice(0, 8) : "";
}

function json(value) {
  return h("pre", {}, JSON.stringify(value, null, 2));
}

// A <details> whose body is built when it is first opened: a run's thousand events list fast.
function lazy(attrs, summary, body) {
  const el = h("details", attrs, summary);
  el.addEventListener("toggle", () => {
    if (el.open && el.childElementCount === 1) el.append(body());
  });
  return el;
}

function can(scope) {
  const scopes = state.session ? state.session.scopes : [];
  return scopes.includes("admin") || scopes.includes(scope);
}

class Problem extends Error {
  constructor(status, body) {
    super(body && body.detail ? sentence(body.detail) : `The server answered ${status}.`);
    this.status = status;
    this.code = body && body.code;
  }
}

function sentence(text) {
  const t = String(text).trim();
  if (!t) return t;
  const first = t[0].toUpperCase() + t.slice(1);
  return /[.!?]$/.test(first) ? first : `${first}.`;
}

// Calls the API; answers the JSON body, or throws a Problem with a readable sentence. An answer
// that arrives once another page is open never settles: the page that asked is gone.
async function api(path, options = {}) {
  const shown = state.shown;
  const gone = () => shown !== state.shown;
  try {
    const body = await call(path, options);
    return gone() ? new Promise(() => {}) : body;
  } catch (e) {
    if (gone()) return new Promise(() => {});
    throw e;
  }
}

async function call(path, options) {
  const init = { method: options.method || "GET", headers: {}, credentials: "same-origin" };
  if (options.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body);
  }
  if (init.method !== "GET" && state.session) init.headers["X-Csrf-Token"] = state.session.csrf;
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new Problem(0, { detail: "the server cannot be reached; check the connection and try again" });
  }
  if (response.status === 401 && !path.startsWith("/console/session")) {
    state.session = null;
    location.hash = "#/signin";
    throw new Problem(401, { detail: "your session ended; sign in again" });
  }
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = { detail: text }; }
  if (!response.ok) throw new Problem(response.status, body);
  return body;
}

function notice(message, kind) {
  const el = document.getElementById("notice");
  if (!message) { el.hidden = true; return; }
  el.textContent = message;
  el.className = kind || "";
  el.hidden = false;
}

// Runs `fn`, showing its failure as a sentence instead of throwing (a page's notice stays until
// the next page or the next notice).
async function attempt(fn) {
  try {
    return await fn();
  } catch (e) {
    notice(e.message || String(e));
    return undefined;
  }
}

function page(title, ...children) {
  const main = document.getElementById("main");
  main.replaceChildren(h("h1", {}, title), ...children);
  document.title = `${title} · Stele`;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

function hashParams() {
  const hash = location.hash.slice(1);
  const at = hash.indexOf("?");
  return new URLSearchParams(at < 0 ? "" : hash.slice(at + 1));
}

// Stops what the last page kept live (polls, event sources, sockets).
function stopLive() {
  for (const stop of state.live) stop();
  state.live = [];
}

function every(ms, fn) {
  const id = setInterval(() => { if (!document.hidden) fn(); }, ms);
  state.live.push(() => clearInterval(id));
}

function download(name, text) {
  const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  const a = h("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// ---- session ---------------------------------------------------------------------------------

const SECTIONS = [
  ["tasks", "Tasks", "tasks:read"],
  ["conversations", "Conversations", "tasks:read"],
  ["rooms", "Rooms", "tasks:read"],
  ["operations", "Operations", "admin"],
  ["audit", "Audit", "audit:read"],
  ["subjects", "People", "subjects:read"],
  ["memory", "Memory", "memory:read"],
];

function renderChrome(current) {
  const nav = document.getElementById("nav");
  const who = document.getElementById("who");
  if (!state.session) {
    nav.replaceChildren();
    who.replaceChildren();
    return;
  }
  nav.replaceChildren(...SECTIONS.filter(([, , scope]) => can(scope)).map(([id, label]) =>
    h("a", { href: `#/${id}`, "aria-current": id === current ? "page" : null }, label)));
  who.replaceChildren(
    h("span", {}, `Signed in as ${state.session.name}`),
    h("button", { class: "secondary", type: "button", onclick: signOut }, "Sign out"));
}

async function signOut() {
  await attempt(() => api("/console/session", { method: "DELETE" }));
  state.session = null;
  location.hash = "#/signin";
}

function signInPage() {
  renderChrome(null);
  const key = h("input", { id: "key", name: "key", type: "password", autocomplete: "off", required: true, size: 48 });
  const form = h("form", { class: "inline", id: "signin" },
    h("label", { for: "key" }, "API key", key),
    h("button", { type: "submit" }, "Sign in"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const session = await attempt(() => api("/console/session", { method: "POST", body: { key: key.value } }));
    if (session) {
      state.session = session;
      location.hash = "#/tasks";
    }
  });
  page("Sign in", h("p", {}, "Sign in with an API key (from ", h("code", {}, "stele keys create"),
    "). What its scopes do not allow is not shown."), form);
  key.focus();
}

// ---- tasks -----------------------------------------------------------------------------------

// A datetime-local input's value (the browser's time zone) as RFC 3339, or "" when empty.
function instant(local) {
  if (!local) return "";
  const d = new Date(local);
  return Number.isNaN(d.getTime()) ? "" : d.toISOString();
}

async function tasksPage() {
  const params = hashParams();
  const field = (name) => params.get(name) || "";
  const filters = {
    status: field("status"), workflow: field("workflow"), channel: field("channel"),
    requester: field("requester"), from: field("from"), to: field("to"), q: field("q"),
    cursor: field("cursor"),
  };
  const workflows = (await attempt(() => api("/v1/workflows"))) || [];
  const select = (name, options, value) => h("select", { name, id: `f-${name}` },
    h("option", { value: "" }, "any"), ...options.map((o) => h("option", { value: o, selected: o === value }, o)));
  const input = (name, label, attrs) => h("label", { for: `f-${name}` }, label,
    h("input", { id: `f-${name}`, name, value: filters[name], ...attrs }));
  const form = h("form", { class: "inline", id: "filters", role: "search" },
    input("q", "Search", { type: "search", size: 18, maxlength: 200, placeholder: "words in the task" }),
    h("label", { for: "f-status" }, "Status", select("status",
      ["pending", "routing", "executing", "completed", "failed", "cancelled"], filters.status)),
    h("label", { for: "f-workflow" }, "Workflow", select("workflow", workflows.map((w) => w.name), filters.workflow)),
    input("channel", "Channel", { size: 10 }),
    input("requester", "Requester", { size: 14 }),
    input("from", "Created from", { type: "datetime-local" }),
    input("to", "until", { type: "datetime-local" }),
    h("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = Object.fromEntries(new FormData(form).entries());
    location.hash = `#/tasks${query(data)}`;
  });
  const table = h("div", { class: "scroll" });
  const pager = h("div", { class: "pager" });
  const children = [form, table, pager];
  if (can("tasks:write")) children.unshift(newTaskForm(workflows));
  page("Tasks", ...children);
  const request = {
    status: filters.status, workflow: filters.workflow, channel: filters.channel,
    requester: filters.requester, created_after: instant(filters.from),
    created_before: instant(filters.to), q: filters.q.trim(), cursor: filters.cursor, limit: 50,
  };
  const load = async () => {
    const data = await attempt(() => api(`/v1/tasks${query(request)}`));
    if (!data) return;
    const none = data.next_cursor ? "No task matches among these; search further below." : "No task matches.";
    table.replaceChildren(h("table", { id: "tasks" },
      h("thead", {}, h("tr", {}, h("th", {}, "Task"), h("th", {}, "Status"), h("th", {}, "Workflow"),
        h("th", { class: "wide" }, "Requester"), h("th", { class: "wide" }, "Input"), h("th", {}, "Created"), h("th", {}, "Updated"))),
      h("tbody", {}, data.tasks.length === 0
        ? h("tr", {}, h("td", { colspan: 7, class: "muted" }, none))
        : data.tasks.map((t) => h("tr", { "data-task": t.id },
          h("td", {}, h("a", { href: `#/tasks/${t.id}`, class: "mono" }, short(t.id))),
          h("td", {}, status(t.status)),
          h("td", {}, t.workflow || ""),
          h("td", { class: "wide" }, `${t.requester.channel}:${t.requester.user_id}`),
          h("td", { class: "wide" }, t.input.length > 80 ? `${t.input.slice(0, 80)}…` : t.input),
          h("td", {}, when(t.created_at)),
          h("td", {}, when(t.updated_at)))))));
    const searched = data.searched === null || data.searched === undefined ? null
      : h("span", { class: "muted", id: "searched" }, `${data.searched} ${data.searched === 1 ? "task" : "tasks"} searched. `);
    pager.replaceChildren(searched, data.next_cursor
      ? h("a", { href: `#/tasks${query({ ...filters, cursor: data.next_cursor })}` }, request.q ? "Search further" : "Next page")
      : h("span", { class: "muted" }, "Last page"));
  };
  await load();
  // A search's page stays as found; the list follows new tasks and changes.
  if (!request.q) every(2000, load);
}

function newTaskForm(workflows) {
  const input = h("textarea", { id: "new-input", name: "input", required: true, rows: 2 });
  const workflow = h("select", { id: "new-workflow", name: "workflow" },
    h("option", { value: "" }, "default"), ...workflows.map((w) => h("option", { value: w.name }, w.name)));
  const form = h("form", { id: "new-task" },
    h("h2", {}, "New task"),
    h("label", { for: "new-input" }, "Input", input),
    h("div", { class: "inline" }, h("label", { for: "new-workflow" }, "Workflow", workflow),
      h("button", { type: "submit" }, "Create task")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { input: input.value };
    if (workflow.value) body.workflow = workflow.value;
    const task = await attempt(() => api("/v1/tasks", { method: "POST", body }));
    if (task) location.hash = `#/tasks/${task.id}`;
  });
  return form;
}

// The steps of a task's events as lanes: (stream, step, attempt) → start, end, outcome, input,
// calls. A timer step ends when its timer fires (no StepCompleted follows). A signal names no
// step: it is tied to the step of its run that waits for a signal of its name.
function lanes(events) {
  const byKey = new Map();
  const waiting = new Map();
  let first = null, last = null;
  for (const e of events) {
    const t = Date.parse(e.recorded_at);
    first = first === null ? t : Math.min(first, t);
    last = last === null ? t : Math.max(last, t);
    const d = e.payload && e.payload.data;
    if (e.type === "SignalReceived" && d) {
      const lane = waiting.get(`${e.stream} ${d.name}`);
      if (lane && lane.end === null) lane.waited = "signalled";
      continue;
    }
    if (!d || !d.step) continue;
    const key = `${e.stream} ${d.step} ${d.attempt || 1}`;
    const lane = byKey.get(key) || { stream: e.stream, step: d.step, attempt: d.attempt || 1, start: t, end: null, outcome: "running", calls: [] };
    if (e.type === "StepScheduled") lane.start = t;
    if (e.type === "StepStarted") lane.start = Math.min(lane.start, Date.parse(d.at || e.recorded_at));
    if (e.type === "StepCompleted" || e.type === "StepFailed") {
      lane.end = t;
      lane.outcome = e.type === "StepCompleted" ? "completed" : "failed";
      lane.calls = Array.isArray(d.calls) ? d.calls : [];
      lane.input = d.input === null ? undefined : d.input;
      lane.output = e.type === "StepCompleted" ? d.output : d.error;
      // A signal that came before its wait began is taken when the wait begins.
      if (d.consumed_signal) lane.waited = "signalled";
    }
    if (e.type === "StepSkipped") { lane.end = t; lane.outcome = "skipped"; }
    if (e.type === "TimerArmed") lane.waited = "timer";
    if (e.type === "TimerFired") { lane.end = t; lane.outcome = "completed"; }
    if (e.type === "WaitStarted") {
      lane.waited = "waits for a signal";
      waiting.set(`${e.stream} ${d.signal}`, lane);
    }
    if (e.type === "WaitTimedOut") { lane.end = t; lane.outcome = "failed"; lane.waited = "wait timed out"; }
    if (e.type === "ChildrenStarted") lane.waited = `${d.children.length} child ${d.children.length === 1 ? "run" : "runs"}`;
    byKey.set(key, lane);
  }
  return { lanes: [...byKey.values()], first, last };
}

function waterfall(events) {
  const { lanes: all, first, last } = lanes(events);
  if (all.length === 0) return h("p", { class: "muted" }, "No step has run yet.");
  const span = Math.max(1, (last || first) - first);
  const runs = [...new Set(all.map((lane) => lane.stream))];
  return h("div", { class: "waterfall", id: "waterfall" }, all.map((lane) => {
    const end = lane.end || last;
    const left = ((lane.start - first) / span) * 100;
    const width = Math.max(0.5, ((end - lane.start) / span) * 100);
    const child = runs.length > 1 && lane.stream !== runs[0] ? `child ${childName(lane.stream, runs[0])} · ` : "";
    const label = `${child}${lane.step}${lane.attempt > 1 ? ` (attempt ${lane.attempt})` : ""}${lane.waited ? ` (${lane.waited})` : ""}`;
    const ms = lane.end ? `${lane.end - lane.start} ms` : "running";
    return h("div", { class: "lane" },
      h("details", { class: "step", "data-step": lane.step },
        h("summary", {}, label, " ", status(lane.outcome), " ", h("span", { class: "muted" }, ms)),
        lane.input !== undefined ? h("div", { class: "step-input" }, h("b", {}, "Input"), json(lane.input)) : null,
        lane.calls.length ? h("div", {}, h("b", {}, "Calls"), lane.calls.map(callView)) : null,
        lane.output !== undefined ? h("div", {}, h("b", {}, "Output"), json(lane.output)) : null),
      h("div", { class: "bar-track", "aria-hidden": "true" }, bar(lane.outcome, left, Math.min(width, 100 - left))));
  }));
}

// A child run's id is its parent's, then its step and index (`<run>.<step>.<index>`): it is
// named by what follows the run's.
function childName(stream, main) {
  const id = stream.split("/")[1] || stream;
  const parent = main.split("/")[1] || main;
  return id.startsWith(`${parent}.`) ? id.slice(parent.length + 1) : short(id);
}

// A bar of the waterfall, placed through the CSSOM (the page's policy allows no inline style).
function bar(outcome, left, width) {
  const el = h("div", { class: `bar ${outcome}` });
  el.style.left = `${left}%`;
  el.style.width = `${width}%`;
  return el;
}

function callView(call) {
  if (call && call.provider) {
    const tokens = `${call.input_tokens ?? "?"} in, ${call.output_tokens ?? "?"} out`;
    return h("div", { class: "call model-call" },
      h("span", { class: "mono" }, `${call.provider}/${call.model}`), " — ", tokens,
      call.latency_ms !== undefined ? ` — ${call.latency_ms} ms` : "",
      call.fallback_index ? ` — fallback ${call.fallback_index}` : "",
      call.error ? h("span", { class: "status failed" }, call.error) : "");
  }
  return h("details", { class: "call tool-call" }, h("summary", {}, (call && (call.tool || call.name)) || "call"), json(call));
}

async function taskPage(id) {
  const summary = h("div", { class: "cards", id: "task-summary" });
  const timeline = h("div", {});
  const list = h("div", { id: "events" });
  const liveMark = h("span", { class: "live", id: "live" });
  const actions = h("div", { class: "inline" });
  page(`Task ${short(id)}`, summary, actions, h("h2", {}, "Timeline ", liveMark), timeline, h("h2", {}, "Events"), list);
  const events = [];
  // `consistent`: read from the log, not the server's view of it (which may be a moment behind
  // the live stream that just ended).
  const renderTask = async (consistent = false) => {
    const task = await attempt(() => api(`/v1/tasks/${id}${consistent ? "?consistent=true" : ""}`));
    if (!task) return null;
    summary.replaceChildren(
      h("div", { class: "card" }, h("b", {}, "Status"), status(task.status)),
      h("div", { class: "card" }, h("b", {}, "Workflow"), task.workflow || "—"),
      h("div", { class: "card" }, h("b", {}, "Requester"), task.requester ? `${task.requester.channel}:${task.requester.user_id}` : "—"),
      h("div", { class: "card" }, h("b", {}, "Input"), task.input),
      h("div", { class: "card", id: "task-result" }, h("b", {}, task.error ? "Error" : "Result"),
        task.error || (task.result === null ? "—" : typeof task.result === "string" ? task.result : JSON.stringify(task.result))));
    actions.replaceChildren();
    if (can("tasks:write") && !["completed", "failed", "cancelled"].includes(task.status)) {
      actions.append(h("button", { class: "danger", type: "button", onclick: async () => {
        if (!confirm("Cancel this task?")) return;
        await attempt(() => api(`/v1/tasks/${id}/cancel`, { method: "POST", body: { reason: "cancelled from the console" } }));
        renderTask();
      } }, "Cancel task"));
    }
    return task;
  };
  const traceCard = h("div", { class: "card", id: "task-trace", hidden: true });
  summary.after(traceCard);
  const renderEvents = () => {
    // The trace the task belongs to (its first event's traceparent), linked when the node says where.
    const parent = events.length > 0 && events[0].metadata && events[0].metadata.trace_id;
    const traceId = parent && parent.split("-")[1];
    if (traceId && /^[0-9a-f]{32}$/.test(traceId)) {
      const template = state.session && state.session.trace_url;
      traceCard.hidden = false;
      traceCard.replaceChildren(h("b", {}, "Trace"), template
        ? h("a", { href: template.replace("{trace_id}", traceId), target: "_blank", rel: "noopener", class: "mono" }, traceId)
        : h("span", { class: "mono" }, traceId));
    }
    timeline.replaceChildren(waterfall(events));
    list.replaceChildren(h("div", {}, events.map((e) => lazy({ class: "event" },
      h("summary", {}, h("span", { class: "mono" }, `${e.stream}#${e.sequence}`), " ", h("b", {}, e.type), " ", h("span", { class: "muted" }, when(e.recorded_at))),
      () => json(e.payload)))));
  };
  const first = await renderTask();
  // A finished task's history is read in one request and drawn once.
  if (first && ["completed", "failed"].includes(first.status)) {
    const history = await attempt(() => api(`/v1/tasks/${id}/events`));
    if (history) {
      events.push(...history.events);
      liveMark.textContent = "finished";
      liveMark.dataset.finished = "true";
      renderEvents();
      return;
    }
  }
  // Live: the task's events over WebSocket (what happened first, then as it happens); the
  // server closes the socket when the task and its run are finished.
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/tasks/${id}/ws`);
  liveMark.textContent = "following live";
  // Redrawn at most every 150 ms while events arrive; the last drawing is the one at the end.
  let timer = null;
  const refresh = () => {
    if (timer) return;
    timer = setTimeout(() => { timer = null; renderEvents(); renderTask(); }, 150);
  };
  socket.onmessage = (msg) => {
    try { events.push(JSON.parse(msg.data).event); } catch (_) { return; }
    refresh();
  };
  socket.onclose = () => {
    clearTimeout(timer);
    timer = null;
    liveMark.textContent = "finished";
    liveMark.dataset.finished = "true";
    renderEvents();
    renderTask(true);
  };
  state.live.push(() => { clearTimeout(timer); socket.onclose = null; socket.close(); });
}

// ---- conversations ---------------------------------------------------------------------------

async function conversationsPage() {
  const table = h("div", { class: "scroll" });
  page("Conversations", table);
  const load = async () => {
    const data = await attempt(() => api("/v1/conversations?limit=100"));
    if (!data) return;
    table.replaceChildren(data.conversations.length === 0 ? h("p", { class: "muted" }, "No conversation yet (Telegram chats and email threads appear here).")
      : h("table", { id: "conversations" }, h("thead", {}, h("tr", {}, h("th", {}, "Conversation"), h("th", {}, "Channel"), h("th", {}, "Status"),
        h("th", {}, "Messages"), h("th", { class: "wide" }, "Quarantined"), h("th", {}, "Last activity"))),
        h("tbody", {}, data.conversations.map((c) => h("tr", { "data-conversation": c.id },
          h("td", {}, h("a", { href: `#/conversations/${encodeURIComponent(c.id)}`, class: "mono" }, c.id)),
          h("td", {}, c.channel || ""), h("td", {}, status(c.status)), h("td", {}, c.message_count),
          h("td", { class: "wide" }, c.quarantined), h("td", {}, when(c.last_event_at)))))));
  };
  await load();
  every(5000, load);
}

async function conversationPage(id) {
  const log = h("div", { id: "conversation-messages" });
  const head = h("div", { class: "cards" });
  page(`Conversation ${id}`, head, log);
  const load = async () => {
    const c = await attempt(() => api(`/v1/conversations/${encodeURIComponent(id)}`));
    if (!c) return;
    head.replaceChildren(
      h("div", { class: "card" }, h("b", {}, "Channel"), c.channel || "—"),
      h("div", { class: "card" }, h("b", {}, "Status"), status(c.status), c.close_reason ? ` ${c.close_reason}` : ""),
      c.subject ? h("div", { class: "card" }, h("b", {}, "Subject"), c.subject) : null,
      h("div", { class: "card" }, h("b", {}, "Quarantined"), String(c.quarantined)));
    log.replaceChildren(...c.messages.map((m) => h("div", { class: "card", "data-seq": m.seq },
      h("b", {}, `#${m.seq} ${m.direction === "inbound" ? "from" : "to"} ${m.from} `, status(m.delivery),
        m.screened ? h("span", { class: "status bad" }, `sanitiser: ${m.screened}`) : ""),
      m.text,
      m.delivery_error ? h("div", { class: "muted" }, `Delivery: ${m.delivery_error} (${m.failed_attempts} failed attempts)`) : null,
      m.task_id ? h("div", {}, h("a", { href: `#/tasks/${m.task_id}` }, `task ${short(m.task_id)}`)) : null)));
  };
  await load();
  every(3000, load);
}

// ---- rooms -----------------------------------------------------------------------------------

async function roomsPage() {
  const data = await attempt(() => api("/v1/rooms"));
  if (!data) return page("Rooms");
  page("Rooms", data.rooms.length === 0 ? h("p", { class: "muted" }, "No room yet (stele rooms create).")
    : h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Room"), h("th", {}, "Topic"), h("th", {}, "Agents"), h("th", {}, "Messages"))),
      h("tbody", {}, data.rooms.map((r) => h("tr", {}, h("td", {}, h("a", { href: `#/rooms/${encodeURIComponent(r.name)}` }, r.name)),
        h("td", {}, r.topic), h("td", {}, r.agents.join(", ")), h("td", {}, r.message_count))))));
}

async function roomPage(name) {
  const room = await attempt(() => api(`/v1/rooms/${encodeURIComponent(name)}?limit=200`));
  if (!room) return page(`Room ${name}`);
  const log = h("div", { id: "room-messages" });
  const line = (m) => h("div", { class: "card" }, h("b", {}, `#${m.seq} ${m.from}${m.agent ? " (agent)" : ""}${m.pinned ? " · pinned" : ""}`),
    m.text === null ? h("span", { class: "muted" }, "[erased]") : m.text);
  log.append(...room.messages.map(line));
  page(`Room ${name}`, h("p", {}, room.topic),
    h("p", { class: "muted" }, `Agents: ${room.agents.map((a) => `${a.name} (${a.role}${a.muted ? ", muted" : ""}${a.removed ? ", removed" : ""})`).join(", ")}`),
    log);
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/rooms/${encodeURIComponent(name)}/ws`);
  const seen = new Set(room.messages.map((m) => m.seq));
  socket.onmessage = (msg) => {
    const { event } = JSON.parse(msg.data);
    const d = event.payload && event.payload.data;
    if (!d || d.seq === undefined || seen.has(d.seq) || !["MessagePosted", "AgentSpoke"].includes(event.type)) return;
    seen.add(d.seq);
    const text = typeof d.text === "string" ? (d.text === "[erased]" ? null : d.text) : null;
    log.append(line({ seq: d.seq, from: d.from || d.agent, agent: event.type === "AgentSpoke", text, pinned: false }));
  };
  state.live.push(() => socket.close());
}

// ---- operations ------------------------------------------------------------------------------

async function operationsPage() {
  const jobs = h("div", { class: "scroll", id: "dead-jobs" });
  const projections = h("div", { class: "scroll", id: "projections" });
  const schedules = h("div", { class: "scroll" });
  const models = h("div", { class: "scroll", id: "models" });
  page("Operations", h("h2", {}, "Dead jobs"), jobs, h("h2", {}, "Projections"), projections,
    h("h2", {}, "Schedules"), schedules, h("h2", {}, "Model providers"), models);
  const loadJobs = async () => {
    const data = await attempt(() => api("/v1/jobs?state=dead&limit=100"));
    if (!data) return;
    jobs.replaceChildren(data.jobs.length === 0 ? h("p", { class: "muted" }, "No dead job.")
      : h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Job"), h("th", {}, "Kind"), h("th", {}, "Attempts"), h("th", { class: "wide" }, "Last error"), h("th", {}, ""))),
        h("tbody", {}, data.jobs.map((j) => h("tr", { "data-job": j.id },
          h("td", { class: "mono" }, short(j.id)), h("td", {}, j.kind), h("td", {}, `${j.attempt}/${j.max_attempts}`),
          h("td", { class: "wide" }, j.last_error || ""),
          h("td", {}, h("button", { type: "button", onclick: async () => {
            const done = await attempt(() => api(`/v1/jobs/${j.id}/retry`, { method: "POST" }));
            if (done) { notice(`Job ${short(j.id)} is queued again.`, "info"); loadJobs(); }
          } }, "Retry")))))));
  };
  const loadProjections = async () => {
    const data = await attempt(() => api("/v1/projections"));
    if (!data) return;
    projections.replaceChildren(h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Projection"), h("th", {}, "Status"), h("th", {}, "Lag"), h("th", {}, ""))),
      h("tbody", {}, data.projections.map((p) => h("tr", {},
        h("td", {}, p.name), h("td", {}, status(p.rebuilding ? "rebuilding" : p.status), p.error ? ` ${p.error}` : ""),
        h("td", {}, `${p.lag_events} events, ${p.lag_seconds.toFixed(1)} s`),
        h("td", {}, h("button", { class: "secondary", type: "button", onclick: async () => {
          if (!confirm(`Rebuild ${p.name} from the log?`)) return;
          const done = await attempt(() => api(`/v1/projections/${encodeURIComponent(p.name)}/rebuild`, { method: "POST" }));
          if (done) { notice(`${p.name} is being rebuilt.`, "info"); loadProjections(); }
        } }, "Rebuild")))))));
  };
  const loadSchedules = async () => {
    const data = await attempt(() => api("/v1/schedules"));
    if (!data) return;
    schedules.replaceChildren(data.schedules.length === 0 ? h("p", { class: "muted" }, "No schedule.")
      : h("table", {}, h("tbody", {}, data.schedules.map((s) => h("tr", {}, h("td", {}, s.name), h("td", {}, status(s.status)),
        h("td", {}, s.cron ? `${s.cron} (${s.timezone})` : `every ${s.every_seconds} s`), h("td", {}, s.workflow),
        h("td", {}, s.next_due ? `next ${when(s.next_due)}` : ""))))));
  };
  const loadModels = async () => {
    const data = await attempt(() => api("/v1/models"));
    if (!data) return;
    models.replaceChildren(h("table", {}, h("tbody", {}, data.providers.map((p) => h("tr", {}, h("td", {}, p.name), h("td", {}, p.kind),
      h("td", {}, status(p.circuit)), h("td", {}, p.models.join(", ")))))));
  };
  await Promise.all([loadJobs(), loadProjections(), loadSchedules(), loadModels()]);
  every(3000, () => { loadProjections(); loadModels(); });
}

// ---- audit -----------------------------------------------------------------------------------

async function auditPage() {
  const params = hashParams();
  const field = (name) => params.get(name) || "";
  const filters = {
    stream: field("stream"), actor: field("actor"), task: field("task"), subject: field("subject"),
    from: field("from"), to: field("to"), after: field("after"),
  };
  const input = (name, label, attrs) => h("label", { for: `a-${name}` }, label,
    h("input", { id: `a-${name}`, name, value: filters[name], ...attrs }));
  const form = h("form", { class: "inline", role: "search", id: "audit-filters" },
    input("stream", "Stream", { placeholder: "task or task/<id>" }),
    input("actor", "Actor", { size: 14 }),
    input("task", "Task", { size: 14 }),
    input("subject", "Person", { size: 14 }),
    input("from", "Recorded from", { type: "datetime-local" }),
    input("to", "until", { type: "datetime-local" }),
    h("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `#/audit${query(Object.fromEntries(new FormData(form).entries()))}`;
  });
  const checkpoints = await attempt(() => api("/v1/audit/checkpoints"));
  const data = await attempt(() => api(`/v1/audit/events${query({
    stream: filters.stream, actor: filters.actor, task: filters.task, subject: filters.subject,
    since: instant(filters.from), until: instant(filters.to), after: filters.after, limit: 100,
  })}`));
  const vkey = checkpoints ? checkpoints.verifier_key : null;
  const rows = data ? data.events.map((e) => {
    const result = h("span", { class: "verify-result" });
    return h("tr", { "data-position": e.position },
      h("td", {}, e.position), h("td", {}, when(e.recorded_at)), h("td", { class: "mono" }, e.stream),
      h("td", {}, e.event_type), h("td", { class: "wide" }, e.actor),
      h("td", {}, h("button", { class: "secondary", type: "button", onclick: async () => {
        result.replaceChildren("checking…");
        try {
          const proof = await api(`/v1/audit/proofs/inclusion${query({ position: e.position })}`);
          const ok = await SteleAudit.verifyInclusion(proof, vkey);
          result.replaceChildren(status("verified"), ` in the signed tree of ${ok.size} events`);
        } catch (err) {
          result.replaceChildren(status("bad"), ` ${err.message}`);
        }
      } }, "Verify"), " ", result));
  }) : [];
  page("Audit", h("p", { class: "muted" }, "Verifying checks the event's inclusion proof against the latest signed checkpoint here in the browser, with the log's verifier key: ",
    h("code", {}, vkey || "none")), form,
    h("div", { class: "scroll" }, h("table", { id: "audit-events" }, h("thead", {}, h("tr", {}, h("th", {}, "Position"), h("th", {}, "Recorded"),
      h("th", {}, "Stream"), h("th", {}, "Event"), h("th", { class: "wide" }, "Actor"), h("th", {}, "Proof"))), h("tbody", {}, rows))),
    data && data.next_cursor ? h("div", { class: "pager" }, h("a", { href: `#/audit${query({ ...filters, after: data.next_cursor })}` }, "Next page")) : null,
    h("h2", {}, "Checkpoints"),
    checkpoints ? h("table", {}, h("tbody", {}, checkpoints.checkpoints.map((c) => h("tr", {},
      h("td", {}, `${c.size} events`), h("td", { class: "mono" }, c.root), h("td", {}, when(c.signed_at)))))) : null);
}

// ---- people ----------------------------------------------------------------------------------

async function subjectsPage() {
  const data = await attempt(() => api("/v1/subjects?limit=200"));
  page("People", !data ? null : data.subjects.length === 0 ? h("p", { class: "muted" }, "No person is known yet.")
    : h("div", { class: "scroll" }, h("table", { id: "subjects" }, h("thead", {}, h("tr", {}, h("th", {}, "Person"), h("th", {}, "Last seen"), h("th", {}, "Events"), h("th", {}, "State"))),
      h("tbody", {}, data.subjects.map((s) => h("tr", { "data-subject": s.id },
        h("td", {}, h("a", { href: `#/subjects/${s.id}`, class: "mono" }, s.id)), h("td", {}, when(s.last_seen_at)), h("td", {}, s.events),
        h("td", {}, s.erased_at ? status("erased") : s.merged_into ? "merged" : s.minor ? "minor" : "")))))));
}

async function subjectPage(id) {
  const s = await attempt(() => api(`/v1/subjects/${id}`));
  if (!s) return page("Person");
  const buttons = h("div", { class: "inline" });
  buttons.append(h("button", { type: "button", id: "export", onclick: async () => {
    const bundle = await attempt(() => api(`/v1/subjects/${id}/export`));
    if (bundle) { download(`subject-${id}.json`, JSON.stringify(bundle, null, 2)); notice("The export was downloaded.", "info"); }
  } }, "Export their data"));
  if (can("subjects:erase") && !s.erased) {
    buttons.append(h("button", { class: "danger", type: "button", id: "erase", onclick: async () => {
      const typed = prompt(`Erasing destroys this person's keys: nothing they gave can be read again. Type the first 8 characters of their id (${short(id)}) to confirm.`);
      if (typed !== short(id)) { notice("Nothing was erased: the confirmation did not match."); return; }
      const done = await attempt(() => api(`/v1/subjects/${id}/erasure`, { method: "POST", body: { reason: "erased from the console" } }));
      if (done) { await subjectPage(id); notice("The person was erased.", "info"); }
    } }, "Erase…"));
  }
  page(`Person ${short(id)}`,
    h("div", { class: "cards" },
      h("div", { class: "card" }, h("b", {}, "Identifiers"), s.identifiers.length ? s.identifiers.join(", ") : "none (erased)"),
      h("div", { class: "card", id: "subject-state" }, h("b", {}, "State"), s.erased ? status("erased") : s.minor ? "minor" : "active")),
    h("h2", {}, "Consents"),
    s.consents.length === 0 ? h("p", { class: "muted" }, "None recorded.") : h("table", { id: "consents" },
      h("thead", {}, h("tr", {}, h("th", {}, "Purpose"), h("th", {}, "State"), h("th", {}, "By"), h("th", {}, "Through"), h("th", {}, "When"))),
      h("tbody", {}, s.consents.map((c) => h("tr", {}, h("td", {}, c.purpose), h("td", {}, c.given ? "given" : "withdrawn"),
        h("td", {}, c.guardian ? `guardian ${c.guardian}` : "the person"), h("td", {}, c.channel), h("td", {}, when(c.at)))))),
    can("subjects:write") && !s.erased ? consentForm(id) : null,
    can("subjects:read") ? buttons : null);
}

// Records a consent the person gave or withdrew (by mail, on paper, on the phone) from the page.
function consentForm(id) {
  const purpose = h("input", { id: "c-purpose", name: "purpose", required: true, size: 14,
    pattern: "[a-z][a-z0-9_\\-]{0,63}", title: "a letter, then letters, digits, - or _", placeholder: "processing" });
  const given = h("select", { id: "c-given", name: "given" },
    h("option", { value: "true" }, "given"), h("option", { value: "false" }, "withdrawn"));
  const guardian = h("input", { id: "c-guardian", name: "guardian", size: 16, maxlength: 200, placeholder: "the person" });
  const form = h("form", { class: "inline", id: "consent" },
    h("label", { for: "c-purpose" }, "Purpose", purpose),
    h("label", { for: "c-given" }, "Consent", given),
    h("label", { for: "c-guardian" }, "Given by (guardian)", guardian),
    h("button", { type: "submit" }, "Record consent"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { purpose: purpose.value.trim(), given: given.value === "true", channel: "console" };
    if (guardian.value.trim()) body.guardian = guardian.value.trim();
    const done = await attempt(() => api(`/v1/subjects/${id}/consents`, { method: "POST", body }));
    if (done) { await subjectPage(id); notice(`The consent to ${body.purpose} was recorded as ${body.given ? "given" : "withdrawn"}.`, "info"); }
  });
  return h("div", {}, h("h2", {}, "Record a consent"), form);
}

// ---- memory ----------------------------------------------------------------------------------

const MEMORY_FILTERS = [
  ["subject", "Person"], ["agent", "Agent"], ["conversation", "Conversation"],
  ["workflow", "Workflow"], ["tenant", "Tenant"],
];

async function memoryPage() {
  const params = hashParams();
  const q = params.get("q") || "";
  const mode = params.get("mode") || "hybrid";
  const at = params.get("at") || "";
  const form = h("form", { class: "inline", role: "search", id: "memory-search" },
    h("label", { for: "m-q" }, "Search", h("input", { id: "m-q", name: "q", value: q, required: true, size: 40 })),
    ...MEMORY_FILTERS.map(([name, label]) => h("label", { for: `m-${name}` }, label,
      h("input", { id: `m-${name}`, name, value: params.get(name) || "", size: 12 }))),
    h("label", { for: "m-mode" }, "By", h("select", { id: "m-mode", name: "mode" },
      ...[["hybrid", "meaning and words"], ["dense", "meaning"], ["text", "words"]].map(([value, label]) =>
        h("option", { value, selected: value === mode }, label)))),
    h("label", { for: "m-at" }, "True at", h("input", { id: "m-at", name: "at", type: "datetime-local", value: at })),
    h("button", { type: "submit" }, "Search"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `#/memory${query(Object.fromEntries(new FormData(form).entries()))}`;
  });
  const results = h("div", { id: "memory-hits" });
  page("Memory", form, results);
  if (!q) return;
  const scope = Object.fromEntries(MEMORY_FILTERS.map(([name]) => [name, params.get(name)]));
  const data = await attempt(() => api(`/v1/memories/search${query({ q, ...scope, mode, at: instant(at) })}`));
  if (!data) return;
  const scopeText = (s) => Object.entries(s).filter(([, v]) => v).map(([k, v]) => `${k} ${v}`).join(", ");
  results.replaceChildren(data.hits.length === 0 ? h("p", { class: "muted" }, "Nothing remembered matches.")
    : h("div", {}, data.hits.map((hit) => h("div", { class: "card", "data-memory": hit.memory_id },
      h("b", {}, `${hit.kind} · score ${hit.score.toFixed(3)}`), hit.content,
      h("div", { class: "muted" }, [scopeText(hit.scope), hit.tags.length ? `tags ${hit.tags.join(", ")}` : "",
        `true from ${when(hit.valid_from)}${hit.valid_until ? ` until ${when(hit.valid_until)}` : ""}`].filter(Boolean).join(" · ")),
      h("div", { class: "muted memory-source" }, "From ", can("audit:read")
        ? h("a", { href: `#/audit${query({ after: hit.position - 1 })}` }, `event ${hit.position}`)
        : `event ${hit.position} of the log`,
      // No page opens an event by its id (nor does the API): the ids it cites are shown whole.
      hit.sources.length ? h("span", {}, `; cites ${hit.sources.length === 1 ? "event" : "events"} `,
        hit.sources.flatMap((id, i) => [i ? ", " : "", h("code", { class: "source" }, id)])) : "")))));
}

// ---- routing ---------------------------------------------------------------------------------

async function route() {
  state.shown += 1;
  stopLive();
  notice(null);
  const path = location.hash.slice(1).split("?")[0] || "/tasks";
  if (!state.session) {
    try { state.session = await api("/console/session"); } catch (_) { state.session = null; }
  }
  if (!state.session || path === "/signin") {
    if (state.session && path === "/signin") { location.hash = "#/tasks"; return; }
    return signInPage();
  }
  const [, section, id] = path.split("/");
  renderChrome(section);
  const allowed = SECTIONS.find(([name]) => name === section);
  if (!allowed || !can(allowed[2])) {
    const firstAllowed = SECTIONS.find(([, , scope]) => can(scope));
    if (firstAllowed && section !== firstAllowed[0]) { location.hash = `#/${firstAllowed[0]}`; return; }
    return page("Nothing to show", h("p", {}, "This key's scopes allow none of the console's pages."));
  }
  const id_ = id ? decodeURIComponent(id) : null;
  switch (section) {
    case "tasks": return id_ ? taskPage(id_) : tasksPage();
    case "conversations": return id_ ? conversationPage(id_) : conversationsPage();
    case "rooms": return id_ ? roomPage(id_) : roomsPage();
    case "operations": return operationsPage();
    case "audit": return auditPage();
    case "subjects": return id_ ? subjectPage(id_) : subjectsPage();
    case "memory": return memoryPage();
    default: return tasksPage();
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  // The skip link moves the focus to the page's content: followed as a link, its `#main` would
  // be taken for a page's address.
  document.querySelector(".skip").addEventListener("click", (event) => {
    event.preventDefault();
    document.getElementById("main").focus();
  });
  route();
});
