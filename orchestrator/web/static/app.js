// Parallel AI Orchestrator dashboard: vanilla JS, no build step.
//
// State comes from the REST API (refreshed every REFRESH_MS) and, live, from two Server-Sent
// Events streams read with fetch() (EventSource cannot send the Authorization header):
//   * the followed job tree: GET /api/jobs/{id}/events?follow=true  (status changes)
//   * the log pane:          GET /api/supervisor/workers/{id}/logs?follow=true
"use strict";

const TOKEN_KEY = "orchestrator.token";
const REFRESH_MS = 2000;
const FINAL_JOB = new Set(["COMPLETED", "FAILED", "CANCELED"]);
const FINAL_WORKER = new Set(["COMPLETED", "FAILED", "TERMINATED"]);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  jobs: new Map(), // id -> job
  workers: new Map(), // id -> worker
  usage: [],
  followedJob: null, // root job id whose event stream is open
  jobStream: null, // AbortController
  logWorker: null,
  logStream: null,
  refreshTimer: null,
  authFailed: false,
};

const $ = (selector) => document.querySelector(selector);

// Build an element: h("li", {class: "job", dataset: {jobId: id}}, child, "text", ...)
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    // Styles through the CSSOM: the page's CSP refuses inline style attributes.
    else if (key === "style") Object.assign(el.style, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// --- messages and connection state --------------------------------------------------------

function showMessage(text, kind = "error") {
  const box = $("#message");
  box.textContent = text;
  box.className = kind === "info" ? "message info" : "message";
  box.hidden = false;
}

function clearMessage() {
  $("#message").hidden = true;
}

function setConnection(stateName, text) {
  const badge = $("#connection");
  badge.dataset.state = stateName;
  badge.textContent = text;
}

// --- API ------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function describeDetail(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).slice(1).join(".") || "body"}: ${d.msg}`).join("; ");
  }
  return JSON.stringify(detail);
}

async function api(path, { method = "GET", body, headers = {}, signal, raw = false } = {}) {
  if (!state.token) throw new ApiError(401, "no token");
  const init = { method, signal, headers: { Authorization: `Bearer ${state.token}`, ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "cannot reach the server");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      detail = describeDetail((await response.json()).detail);
    } catch (_) {
      /* not JSON */
    }
    const error = new ApiError(response.status, detail);
    handleAuthError(error);
    throw error;
  }
  return raw ? response : response.json();
}

function handleAuthError(error) {
  if (error.status === 401) {
    state.authFailed = true;
    setConnection("error", "token rejected");
    showMessage(`The server rejected the token (401): ${error.message}. Paste a valid token above and press Connect.`);
    stopEverything();
  } else if (error.status === 403) {
    showMessage(`Not allowed (403): ${error.message}.`);
  }
}

function reportError(action, error) {
  if (error.name === "AbortError" || error.status === 401 || error.status === 403) return;
  const prefix = error.status ? `${action} failed (${error.status})` : `${action} failed`;
  showMessage(`${prefix}: ${error.message}`);
}

// --- Server-Sent Events over fetch ----------------------------------------------------------

// Reads an SSE response; calls onEvent({event, data, id}) per message. Returns the last id seen.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // sse-starlette ends lines with CRLF; keep a trailing CR until its LF arrives.
    const keep = buffer.endsWith("\r") ? "\r" : "";
    buffer = (keep ? buffer.slice(0, -1) : buffer).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const message = { event: "message", data: "", id: null };
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue; // comment lines are heartbeats
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") message.event = val;
        else if (field === "data") data.push(val);
        else if (field === "id") message.id = val;
      }
      if (!data.length && message.id === null) continue;
      message.data = data.join("\n");
      onEvent(message);
    }
    buffer += keep;
  }
}

// Follows an SSE endpoint, reconnecting with Last-Event-ID until an `end` event arrives.
async function follow(path, controller, onEvent) {
  let lastId = null;
  let ended = false;
  while (!ended && !controller.signal.aborted) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await api(path, { headers, signal: controller.signal, raw: true });
      await readEvents(response, (message) => {
        if (message.id) lastId = message.id;
        if (message.event === "end") ended = true;
        onEvent(message);
      });
    } catch (error) {
      if (error.name === "AbortError" || error.status) return; // aborted, or an HTTP error (shown)
    }
    if (!ended) await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// --- the followed job tree ------------------------------------------------------------------

function followJob(jobId) {
  const root = rootOf(jobId);
  if (state.followedJob === root) return;
  if (state.jobStream) state.jobStream.abort();
  state.followedJob = root;
  const controller = new AbortController();
  state.jobStream = controller;
  $("#following").textContent = `live: ${root}`;
  follow(`/api/jobs/${encodeURIComponent(root)}/events?follow=true`, controller, onJobEvent).finally(() => {
    if (state.jobStream === controller) $("#following").textContent = `${root} finished`;
  });
  render();
}

function onJobEvent(message) {
  if (message.event === "job.status" || message.event === "worker.status") {
    const event = JSON.parse(message.data);
    if (event.worker_id) {
      const worker = state.workers.get(event.worker_id);
      if (worker) worker.status = event.to_status;
      else scheduleRefresh(); // a worker we have not listed yet
    } else {
      const job = state.jobs.get(event.job_id);
      if (job) job.status = event.to_status;
      else scheduleRefresh(); // a new child job
    }
    render();
  } else if (message.event === "end") {
    scheduleRefresh();
  }
}

function rootOf(jobId) {
  let job = state.jobs.get(jobId);
  while (job && job.parent_job_id && state.jobs.has(job.parent_job_id)) job = state.jobs.get(job.parent_job_id);
  return job ? job.id : jobId;
}

// --- the log pane ---------------------------------------------------------------------------

function followLog(workerId) {
  if (state.logStream) state.logStream.abort();
  state.logWorker = workerId;
  const controller = new AbortController();
  state.logStream = controller;
  const pane = $("#log-lines");
  pane.textContent = "";
  $("#log-title").textContent = `— ${workerId}`;
  const append = (text, cls) => {
    pane.append(cls ? h("span", { class: cls }, text + "\n") : text + "\n");
    if ($("#log-autoscroll").checked) pane.scrollTop = pane.scrollHeight;
  };
  follow(`/api/supervisor/workers/${encodeURIComponent(workerId)}/logs?follow=true`, controller, (message) => {
    const data = JSON.parse(message.data || "{}");
    if (message.event === "log") append(data.text);
    else if (message.event === "status") append(`— status ${data.status}${data.status_reason ? ` (${data.status_reason})` : ""}`, "note");
    else if (message.event === "end") append(`— end of log: worker ${data.status}, ${data.lines} lines`, "note");
  });
  render();
}

// --- actions --------------------------------------------------------------------------------

async function workerAction(workerId, action) {
  try {
    const worker = await api(`/api/supervisor/workers/${encodeURIComponent(workerId)}/${action}`, { method: "POST" });
    state.workers.set(worker.id, worker);
    clearMessage();
    render();
  } catch (error) {
    reportError(`${action} ${workerId}`, error);
  }
}

async function cancelJob(jobId) {
  try {
    const job = await api(`/api/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });
    state.jobs.set(job.id, job);
    clearMessage();
    render();
    scheduleRefresh();
  } catch (error) {
    reportError(`cancel ${jobId}`, error);
  }
}

async function submitJob(event) {
  event.preventDefault();
  const body = {
    task_description: $("#f-task").value,
    worker_count: Number($("#f-workers").value || 1),
    depth: Number($("#f-depth").value || 0),
  };
  const parent = $("#f-parent").value.trim();
  const agent = $("#f-agent").value.trim();
  const options = $("#f-options").value.trim();
  if (parent) body.parent_job_id = parent;
  if (agent) body.agent = agent;
  if (options) {
    try {
      body.agent_options = JSON.parse(options);
    } catch (error) {
      showMessage(`Agent options are not valid JSON: ${error.message}`);
      return;
    }
  }
  $("#f-submit").disabled = true;
  try {
    const job = await api("/api/jobs/submit", { method: "POST", body });
    state.jobs.set(job.id, job);
    document.body.dataset.lastJob = job.id;
    showMessage(`Submitted ${job.id}.`, "info");
    followJob(job.id);
    scheduleRefresh();
  } catch (error) {
    reportError("Submit", error);
  } finally {
    $("#f-submit").disabled = false;
  }
}

// --- refresh and render ---------------------------------------------------------------------

async function refresh() {
  if (!state.token || state.authFailed) return;
  try {
    const [jobs, workers, usage] = await Promise.all([
      api("/api/jobs?limit=300"),
      api("/api/supervisor/workers?limit=500"),
      api("/api/resources/usage").catch((error) => {
        if (error.status === 403) return { usage: null }; // token without resources:read
        throw error;
      }),
    ]);
    state.jobs = new Map(jobs.jobs.map((job) => [job.id, job]));
    state.workers = new Map(workers.workers.map((worker) => [worker.id, worker]));
    state.usage = usage.usage;
    setConnection("connected", "connected");
    render();
  } catch (error) {
    if (error.status === 0) setConnection("error", "server unreachable");
    reportError("Refresh", error);
  }
}

function scheduleRefresh() {
  clearTimeout(state.refreshSoon);
  state.refreshSoon = setTimeout(refresh, 150);
}

function elapsed(item) {
  if (!item.started_at) return "";
  const end = item.finished_at ? new Date(item.finished_at) : new Date();
  const seconds = Math.max(0, (end - new Date(item.started_at)) / 1000);
  return seconds < 120 ? `${seconds.toFixed(1)}s` : `${Math.round(seconds / 60)}m`;
}

function statusBadge(status) {
  return h("span", { class: "status", dataset: { status } }, status);
}

function renderJob(job, childrenOf, workersOf) {
  const workers = workersOf.get(job.id) || [];
  const line = h(
    "div",
    { class: "job-line", onclick: () => followJob(job.id), title: job.task_description },
    statusBadge(job.status),
    h("span", { class: "job-id" }, job.id),
    h("span", { class: "task" }, job.task_description),
    h("span", { class: "chips" }, workers.map((w) => h("span", { class: "chip", dataset: { status: w.status }, title: `${w.id} ${w.status}` }))),
    h("span", { class: "meta" }, `d${job.depth} · ${job.worker_count}× ${job.agent} ${elapsed(job)}`),
    FINAL_JOB.has(job.status)
      ? null
      : h("button", { class: "small danger", dataset: { action: "cancel" }, onclick: (e) => { e.stopPropagation(); cancelJob(job.id); } }, "Cancel"),
  );
  const kids = (childrenOf.get(job.id) || []).map((child) => renderJob(child, childrenOf, workersOf));
  return h(
    "li",
    { class: job.id === state.followedJob ? "job selected" : "job", dataset: { jobId: job.id, status: job.status } },
    line,
    kids.length ? h("ul", {}, kids) : null,
  );
}

function renderJobs() {
  const childrenOf = new Map();
  const roots = [];
  const byCreated = [...state.jobs.values()].sort((a, b) => a.created_at.localeCompare(b.created_at));
  for (const job of byCreated) {
    if (job.parent_job_id && state.jobs.has(job.parent_job_id)) {
      if (!childrenOf.has(job.parent_job_id)) childrenOf.set(job.parent_job_id, []);
      childrenOf.get(job.parent_job_id).push(job);
    } else roots.push(job);
  }
  roots.reverse(); // newest root first
  const workersOf = new Map();
  for (const worker of state.workers.values()) {
    if (!workersOf.has(worker.job_id)) workersOf.set(worker.job_id, []);
    workersOf.get(worker.job_id).push(worker);
  }
  for (const list of workersOf.values()) list.sort((a, b) => a.worker_index - b.worker_index);
  const tree = $("#jobs");
  tree.replaceChildren(...(roots.length ? roots.map((job) => renderJob(job, childrenOf, workersOf)) : [h("li", { class: "empty" }, "No jobs yet.")]));
}

function renderWorkers() {
  const rows = [...state.workers.values()].sort((a, b) => b.created_at.localeCompare(a.created_at) || a.worker_index - b.worker_index);
  const body = $("#workers");
  if (!rows.length) {
    body.replaceChildren(h("tr", { class: "empty" }, h("td", { colspan: 6 }, "No workers yet.")));
    return;
  }
  body.replaceChildren(
    ...rows.map((w) => {
      const live = !FINAL_WORKER.has(w.status);
      const button = (action, label, enabled, cls = "small") =>
        h("button", { class: cls, dataset: { action }, disabled: !enabled, onclick: () => workerAction(w.id, action) }, label);
      return h(
        "tr",
        { class: w.id === state.logWorker ? "selected" : null, dataset: { workerId: w.id, jobId: w.job_id, status: w.status } },
        h("td", { class: "mono" }, w.id),
        h("td", { class: "mono" }, w.job_id),
        h("td", {}, w.depth),
        h("td", {}, statusBadge(w.status)),
        h("td", {}, elapsed(w)),
        h(
          "td",
          { class: "actions" },
          button("pause", "Pause", w.status === "RUNNING"),
          button("resume", "Resume", w.status === "PAUSED"),
          button("terminate", "Terminate", live, "small danger"),
          h("button", { class: "small", dataset: { action: "log" }, onclick: () => followLog(w.id) }, "Log"),
        ),
      );
    }),
  );
}

function renderQuotas() {
  const box = $("#quotas");
  if (state.usage === null) {
    box.replaceChildren(h("p", { class: "empty" }, "This token cannot read resources (resources:read)."));
    return;
  }
  box.replaceChildren(
    ...state.usage.map((u) => {
      const max = u.max_workers ?? u.allocated + u.available;
      const pct = max ? Math.round((100 * u.allocated) / max) : 0;
      return h(
        "div",
        { class: "quota", dataset: { depth: u.depth } },
        h("span", {}, `depth ${u.depth}`),
        h("div", { class: u.available === 0 ? "bar full" : "bar" }, h("span", { style: { width: `${pct}%` } })),
        h("span", { class: "meta" }, `${u.allocated} / ${max}`),
      );
    }),
  );
}

function render() {
  renderJobs();
  renderWorkers();
  renderQuotas();
}

// --- start and stop -------------------------------------------------------------------------

function stopEverything() {
  clearInterval(state.refreshTimer);
  state.refreshTimer = null;
  for (const stream of [state.jobStream, state.logStream]) if (stream) stream.abort();
  state.jobStream = state.logStream = null;
  state.followedJob = state.logWorker = null;
}

function connect() {
  stopEverything();
  state.authFailed = false;
  if (!state.token) {
    setConnection("disconnected", "not connected");
    showMessage("Enter an API token (create one with `orchestrator token`) to use the dashboard.", "info");
    return;
  }
  clearMessage();
  setConnection("disconnected", "connecting…");
  refresh();
  state.refreshTimer = setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#token-input").value = state.token;
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("#token-input").value.trim();
    if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
    else sessionStorage.removeItem(TOKEN_KEY);
    connect();
  });
  $("#token-clear").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = "";
    $("#token-input").value = "";
    state.jobs.clear();
    state.workers.clear();
    state.usage = [];
    render();
    connect();
  });
  $("#submit-form").addEventListener("submit", submitJob);
  connect();
});
