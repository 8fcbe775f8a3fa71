// Parallel AI Orchestrator dashboard: vanilla JS, no library, no build step, no inline script or
// style (it runs under `Content-Security-Policy: default-src 'self'`).
//
// What is shown lives in the URL (?job=…&worker=…&status=…&page=…); every navigation is a
// pushState, so Back and Forward work and any view can be linked to.
//
// Nothing re-renders on a timer. Rows are keyed by id and patched in place when a Server-Sent
// Events stream (read with fetch(): EventSource cannot send the Authorization header) says
// something changed, so an element a user is about to click stays attached:
//   * the fleet:    GET /api/fleet/events?follow=true   (every job.status / worker.status; the
//                   selected job's panel and timeline re-read what changed in its tree)
//   * the log pane: GET /api/supervisor/workers/{id}/logs?follow=true
// Two streams at most: a browser opens only six connections to a server, for all its tabs.
"use strict";

const TOKEN_KEY = "orchestrator.token";
const PAGE_SIZE = 50;
const STATUSES = ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELED"];
const FINAL_JOB = new Set(["COMPLETED", "FAILED", "CANCELED"]);
const FINAL_WORKER = new Set(["COMPLETED", "FAILED", "TERMINATED"]);
const FILTER_KEYS = ["status", "depth", "agent", "repo", "after", "before", "q", "flat"];

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  view: {}, // what the URL says: job, worker, page, filters
  jobs: new Map(), // id -> job, every job on screen
  workers: new Map(), // id -> worker of the selected job
  expanded: new Set(), // job ids whose children are shown in the list
  fleet: null, // AbortController of the fleet stream
  logStream: null,
  listToken: 0, // the newest list request (an older answer is dropped)
  panelToken: 0,
  authFailed: false,
};

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

// Build an element: h("li", {class: "job", dataset: {jobId: id}, onclick: f}, child, "text", ...)
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

// --- messages -------------------------------------------------------------------------------

function showMessage(text, kind = "error") {
  const box = $("#message");
  box.textContent = text;
  box.className = kind === "info" ? "message info" : "message";
  box.hidden = false;
}

function clearMessage() {
  $("#message").hidden = true;
}

function setConnection(name, text) {
  const badge = $("#connection");
  badge.dataset.state = name;
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
    if (error.status === 401) {
      state.authFailed = true;
      setConnection("error", "token rejected");
      showMessage(`The server rejected the token (401): ${error.message}. Paste a valid token above and press Connect.`);
      stopStreams();
    }
    throw error;
  }
  return raw ? response : response.json();
}

function reportError(action, error) {
  if (error.name === "AbortError" || error.status === 401) return;
  const prefix = error.status ? `${action} failed (${error.status})` : `${action} failed`;
  showMessage(`${prefix}: ${error.message}`);
}

const enc = encodeURIComponent;

// --- Server-Sent Events over fetch ----------------------------------------------------------

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
        if (!line || line.startsWith(":")) continue; // comments are heartbeats
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") message.event = val;
        else if (field === "data") data.push(val);
        else if (field === "id") message.id = val;
      }
      if (!data.length) continue;
      message.data = data.join("\n");
      onEvent(message);
    }
    buffer += keep;
  }
}

// Follows an SSE endpoint, reconnecting with Last-Event-ID until `end` (or an abort).
async function follow(path, controller, onEvent, { lastId = null, onOpen = null } = {}) {
  let ended = false;
  while (!ended && !controller.signal.aborted) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await api(path, { headers, signal: controller.signal, raw: true });
      if (onOpen) onOpen();
      await readEvents(response, (message) => {
        if (message.id) lastId = message.id;
        if (message.event === "end") ended = true;
        onEvent(message);
      });
    } catch (error) {
      if (error.name === "AbortError" || error.status) return;
    }
    if (!ended && !controller.signal.aborted) {
      setConnection("error", "reconnecting…");
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
}

// --- the URL: what is shown -----------------------------------------------------------------

function viewFromUrl() {
  const params = new URLSearchParams(location.search);
  const view = {};
  for (const key of ["job", "worker", "page", ...FILTER_KEYS]) {
    const value = params.get(key);
    if (value) view[key] = value;
  }
  // Also accepted: #/jobs/j_…/workers/w_…
  const hash = location.hash.match(/^#\/jobs\/([^/]+)(?:\/workers\/([^/]+))?/);
  if (hash) {
    view.job = decodeURIComponent(hash[1]);
    if (hash[2]) view.worker = decodeURIComponent(hash[2]);
  }
  return view;
}

function urlOf(view) {
  const params = new URLSearchParams();
  for (const key of ["job", "worker", ...FILTER_KEYS, "page"]) {
    if (view[key] && !(key === "page" && view[key] === "1")) params.set(key, view[key]);
  }
  const query = params.toString();
  return query ? `/?${query}` : "/";
}

// Go to `changes` (a new history entry), then show the difference.
function navigate(changes, { replace = false } = {}) {
  const next = { ...state.view, ...changes };
  for (const key of Object.keys(next)) if (next[key] === null || next[key] === "") delete next[key];
  const url = urlOf(next);
  if (replace) history.replaceState(null, "", url);
  else if (url !== location.pathname + location.search) history.pushState(null, "", url);
  show(next);
}

function listKey(view) {
  return JSON.stringify([view.page || "1", ...FILTER_KEYS.map((k) => view[k] || "")]);
}

function show(view) {
  if (view.worker && !view.job) {
    // A link to a worker alone: find its job, then show both.
    api(`/api/supervisor/workers/${enc(view.worker)}`)
      .then((worker) => navigate({ ...view, job: worker.job_id }, { replace: true }))
      .catch((error) => reportError(`Opening ${view.worker}`, error));
    return;
  }
  const previous = state.view;
  state.view = view;
  syncFilterInputs(view);
  if (listKey(previous) !== listKey(view) || !state.listLoaded) loadList();
  if (previous.job !== view.job || state.panelJob !== view.job) openPanel(view.job);
  else markSelected();
  if (previous.worker !== view.worker || state.logWorker !== view.worker) openLog(view.worker);
}

// --- filters ---------------------------------------------------------------------------------

function isFlat(view) {
  return Boolean(view.flat || view.status || view.depth || view.q);
}

function localToIso(value) {
  return value ? new Date(value).toISOString() : "";
}

function isoToLocal(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function syncFilterInputs(view) {
  const set = (sel, value) => {
    const el = $(sel);
    if (document.activeElement !== el && el.value !== value) el.value = value;
  };
  set("#q", view.q || "");
  set("#flt-depth", view.depth || "");
  set("#flt-agent", view.agent || "");
  set("#flt-repo", view.repo || "");
  set("#flt-after", isoToLocal(view.after));
  set("#flt-before", isoToLocal(view.before));
  $("#flt-flat").checked = Boolean(view.flat);
  const active = ["depth", "agent", "repo", "after", "before", "flat"].filter((k) => view[k]);
  $("#filter-summary").textContent = active.length ? `(${active.length} set)` : "";
  if (active.length) $("#more-filters").open = true;
  for (const button of $$("#counts button")) {
    button.setAttribute("aria-pressed", String((view.status || "") === button.dataset.status));
  }
}

function filterParams(view) {
  const params = new URLSearchParams();
  if (view.status) params.set("status", view.status);
  if (view.depth) params.set("depth", view.depth);
  if (view.agent) params.set("agent", view.agent);
  if (view.repo) params.set("repository", view.repo);
  if (view.after) params.set("created_after", view.after);
  if (view.before) params.set("created_before", view.before);
  if (view.q) params.set("q", view.q);
  if (!isFlat(view)) params.set("root_only", "true");
  return params;
}

function filtersChanged() {
  navigate({
    q: $("#q").value.trim(),
    depth: $("#flt-depth").value.trim(),
    agent: $("#flt-agent").value.trim(),
    repo: $("#flt-repo").value.trim(),
    after: localToIso($("#flt-after").value),
    before: localToIso($("#flt-before").value),
    flat: $("#flt-flat").checked ? "1" : "",
    page: "1",
  });
}

// --- the jobs list ---------------------------------------------------------------------------

function statusBadge(status, jobId) {
  return h("span", { class: "status", dataset: { status, statusOf: jobId } }, status);
}

function shortTime(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  const today = new Date().toDateString() === date.toDateString();
  return today ? date.toLocaleTimeString() : date.toLocaleString();
}

function jobRow(job, level) {
  const flat = isFlat(state.view);
  const canExpand = !flat;
  const li = h("li", {
    class: "job",
    role: "treeitem",
    dataset: { jobId: job.id, status: job.status, level: String(level) },
    "aria-level": String(level + 1),
  });
  const line = h(
    "div",
    { class: "job-line", tabindex: "0", dataset: { jobId: job.id } },
    canExpand
      ? h("button", { class: "toggle", type: "button", tabindex: "-1", dataset: { action: "toggle" }, "aria-label": "Show or hide sub-jobs" }, "▸")
      : h("span", { class: "toggle-space" }),
    statusBadge(job.status, job.id),
    h("span", { class: "job-id mono" }, job.id),
    h("span", { class: "task", title: job.task_description }, job.task_description),
    h("span", { class: "reason", dataset: { reasonOf: job.id } }, reasonText(job)),
    h("span", { class: "meta" }, `d${job.depth} · ${job.worker_count}× ${job.agent} · ${shortTime(job.created_at)}`),
  );
  li.append(line);
  if (canExpand) {
    li.append(h("ul", { class: "children", role: "group", hidden: true }));
    li.setAttribute("aria-expanded", "false");
  }
  state.jobs.set(job.id, job);
  if (canExpand && (!FINAL_JOB.has(job.status) || state.expanded.has(job.id))) expand(li, { quiet: true });
  return li;
}

function reasonText(job) {
  return job.status === "FAILED" || job.status === "CANCELED" ? job.status_reason || "" : "";
}

async function loadList() {
  const token = ++state.listToken;
  const view = state.view;
  const page = Math.max(1, Number(view.page || 1) || 1);
  const params = filterParams(view);
  params.set("limit", String(PAGE_SIZE));
  params.set("offset", String((page - 1) * PAGE_SIZE));
  const started = performance.now();
  $("#jobs").setAttribute("aria-busy", "true");
  loadCounts();
  try {
    const list = await api(`/api/jobs?${params}`);
    if (token !== state.listToken) return;
    state.listLoaded = true;
    const list_el = $("#jobs");
    list_el.replaceChildren(
      ...(list.jobs.length
        ? list.jobs.map((job) => jobRow(job, 0))
        : [h("li", { class: "empty" }, state.token ? "No jobs match." : "Connect with a token to see jobs.")]),
    );
    const first = list.total ? (page - 1) * PAGE_SIZE + 1 : 0;
    const last = (page - 1) * PAGE_SIZE + list.jobs.length;
    const what = isFlat(view) ? "jobs" : "job trees";
    $("#page-info").textContent = `${first}–${last} of ${list.total.toLocaleString("en")} ${what}`;
    $("#page-prev").disabled = page <= 1;
    $("#page-next").disabled = last >= list.total;
    $("#list-mode").textContent = isFlat(view) ? "matching jobs, newest first" : "job trees, newest first";
    $("#new-jobs").hidden = true;
    document.body.dataset.listTotal = String(list.total);
    document.body.dataset.listMs = String(Math.round(performance.now() - started));
    // Since navigation began: what a user waits for the first page (the web test prints it).
    if (!document.body.dataset.firstRenderMs) document.body.dataset.firstRenderMs = String(Math.round(performance.now()));
    markSelected();
  } catch (error) {
    if (token === state.listToken) reportError("Loading jobs", error);
  } finally {
    if (token === state.listToken) $("#jobs").removeAttribute("aria-busy");
  }
}

async function expand(li, { quiet = false } = {}) {
  const jobId = li.dataset.jobId;
  const children = $(":scope > ul.children", li);
  const toggle = $(":scope > .job-line .toggle", li);
  if (!children) return;
  state.expanded.add(jobId);
  children.hidden = false;
  li.setAttribute("aria-expanded", "true");
  if (toggle) toggle.textContent = "▾";
  if (li.dataset.loaded) return;
  li.dataset.loaded = "loading";
  try {
    const list = await api(`/api/jobs?parent_job_id=${enc(jobId)}&limit=1000`);
    const level = Number(li.dataset.level) + 1;
    const rows = list.jobs.reverse().map((job) => jobRow(job, level)); // oldest child first
    children.replaceChildren(...rows);
    li.dataset.loaded = "yes";
    // Sub-jobs announced while the list was on its way (it may have been read before them).
    for (const id of li.pendingChildren || []) if (!$(`li.job[data-job-id="${CSS.escape(id)}"]`, children)) insertChild(li, id);
    delete li.pendingChildren;
    if (!rows.length && !$(":scope > li.job", children)) {
      li.classList.add("leaf");
      li.removeAttribute("aria-expanded");
      if (toggle) toggle.textContent = "·";
    }
  } catch (error) {
    delete li.dataset.loaded;
    if (!quiet) reportError(`Loading sub-jobs of ${jobId}`, error);
  }
}

function collapse(li) {
  const children = $(":scope > ul.children", li);
  if (!children) return;
  state.expanded.delete(li.dataset.jobId);
  children.hidden = true;
  if (!li.classList.contains("leaf")) li.setAttribute("aria-expanded", "false");
  const toggle = $(":scope > .job-line .toggle", li);
  if (toggle && !li.classList.contains("leaf")) toggle.textContent = "▸";
}

function markSelected() {
  for (const line of $$(".job-line.selected")) {
    line.classList.remove("selected");
    line.removeAttribute("aria-selected");
  }
  if (!state.view.job) return;
  for (const line of $$(`.job-line[data-job-id="${CSS.escape(state.view.job)}"]`)) {
    line.classList.add("selected");
    line.setAttribute("aria-selected", "true");
  }
}

// --- counts per status -----------------------------------------------------------------------

function buildCounts() {
  const box = $("#counts");
  box.replaceChildren(
    h("button", { type: "button", class: "count", dataset: { status: "" }, "aria-pressed": "false" }, "All ", h("b", { dataset: { countOf: "" } }, "–")),
    ...STATUSES.map((s) =>
      h("button", { type: "button", class: "count", dataset: { status: s }, "aria-pressed": "false" }, h("span", { class: "dot", dataset: { status: s } }), `${s.toLowerCase()} `, h("b", { dataset: { countOf: s } }, "–")),
    ),
  );
}

async function loadCounts() {
  const params = filterParams(state.view);
  params.delete("status");
  params.delete("root_only"); // every job of every tree, as the status filter lists them
  const token = (state.countsToken = (state.countsToken || 0) + 1);
  try {
    const counts = await api(`/api/jobs/counts?${params}`);
    if (token !== state.countsToken) return;
    for (const [status, n] of Object.entries(counts.counts)) {
      const el = $(`#counts b[data-count-of="${status}"]`);
      if (el) el.textContent = n.toLocaleString("en");
    }
    $('#counts b[data-count-of=""]').textContent = counts.total.toLocaleString("en");
  } catch (error) {
    if (token === state.countsToken) reportError("Counting jobs", error);
  }
}
const loadCountsSoon = debounce(loadCounts, 500);

// --- the fleet stream: patch what changed ----------------------------------------------------

function startFleet() {
  if (state.fleet) state.fleet.abort();
  const controller = new AbortController();
  state.fleet = controller;
  follow("/api/fleet/events?follow=true", controller, onFleetEvent, {
    onOpen: () => setConnection("connected", "connected"),
  }).then(() => {
    if (state.fleet === controller && !controller.signal.aborted) setConnection("error", "disconnected");
  });
}

function onFleetEvent(message) {
  let event;
  try {
    event = JSON.parse(message.data);
  } catch (_) {
    return;
  }
  if (message.event === "job.status") onJobStatus(event);
  else if (message.event === "worker.status") onWorkerStatus(event);
}

function patchJobStatus(jobId, status, reason) {
  const job = state.jobs.get(jobId);
  if (job) {
    job.status = status;
    if (reason !== undefined && (status === "FAILED" || status === "CANCELED")) job.status_reason = reason;
  }
  for (const el of $$(`[data-status-of="${CSS.escape(jobId)}"]`)) {
    el.textContent = status;
    el.dataset.status = status;
  }
  for (const li of $$(`li.job[data-job-id="${CSS.escape(jobId)}"]`)) li.dataset.status = status;
  if (job) for (const el of $$(`[data-reason-of="${CSS.escape(jobId)}"]`)) el.textContent = reasonText(job);
}

function onJobStatus(event) {
  loadCountsSoon();
  patchJobStatus(event.job_id, event.to_status, event.reason); // wherever it is shown
  if (event.job_id === state.panelJob) refreshPanelJob();
  if (touchesPanel(event)) refreshTimelineSoon();
  if (event.from_status !== null) return;
  if ($(`#jobs li.job[data-job-id="${CSS.escape(event.job_id)}"]`)) return; // listed already
  // A new job: into its parent's open children, or on top of the first page of trees.
  if (event.parent_job_id) {
    for (const li of $$(`li.job[data-job-id="${CSS.escape(event.parent_job_id)}"]`)) {
      li.classList.remove("leaf");
      if (!li.getAttribute("aria-expanded")) li.setAttribute("aria-expanded", li.dataset.loaded && !$(":scope > ul.children", li).hidden ? "true" : "false");
      const toggle = $(":scope > .job-line .toggle", li);
      if (toggle && toggle.textContent === "·") toggle.textContent = $(":scope > ul.children", li).hidden ? "▸" : "▾";
      if (li.dataset.loaded === "yes") insertChild(li, event.job_id);
      else if (li.dataset.loaded === "loading") (li.pendingChildren ||= []).push(event.job_id);
    }
    if (state.panelJob === event.parent_job_id) loadPanelChildren();
  } else if (!isFlat(state.view) && (state.view.page || "1") === "1" && !hasNarrowingFilter(state.view)) {
    insertRoot(event.job_id);
  } else {
    $("#new-jobs").hidden = false;
  }
}

function hasNarrowingFilter(view) {
  return Boolean(view.agent || view.repo || view.after || view.before);
}

async function insertChild(li, jobId) {
  try {
    const job = await api(`/api/jobs/${enc(jobId)}`);
    if ($(`li.job[data-job-id="${CSS.escape(jobId)}"]`, li)) return;
    $(":scope > ul.children", li).append(jobRow(job, Number(li.dataset.level) + 1));
  } catch (error) {
    reportError(`Loading ${jobId}`, error);
  }
}

async function insertRoot(jobId) {
  try {
    const job = await api(`/api/jobs/${enc(jobId)}`);
    const list = $("#jobs");
    if ($(`:scope > li.job[data-job-id="${CSS.escape(jobId)}"]`, list)) return;
    $(":scope > li.empty", list)?.remove();
    list.prepend(jobRow(job, 0));
    const rows = $$(":scope > li.job", list);
    if (rows.length > PAGE_SIZE) rows.at(-1).remove(); // it moves to the next page
    const total = Number(document.body.dataset.listTotal || 0) + 1;
    document.body.dataset.listTotal = String(total);
    $("#page-info").textContent = `1–${Math.min(total, PAGE_SIZE)} of ${total.toLocaleString("en")} job trees`;
    $("#page-next").disabled = total <= PAGE_SIZE;
    markSelected();
  } catch (error) {
    reportError(`Loading ${jobId}`, error);
  }
}

function onWorkerStatus(event) {
  loadQuotasSoon();
  if (!touchesPanel(event)) return;
  refreshTimelineSoon();
  const worker = state.workers.get(event.worker_id);
  if (worker) {
    worker.status = event.to_status;
    if (event.reason) worker.status_reason = event.reason;
    for (const el of $$(`[data-worker-status-of="${CSS.escape(event.worker_id)}"]`)) {
      el.textContent = event.to_status;
      el.dataset.status = event.to_status;
    }
    const row = $(`#workers tr[data-worker-id="${CSS.escape(event.worker_id)}"]`);
    if (row) {
      row.dataset.status = event.to_status;
      updateWorkerButtons(row, worker);
    }
  }
  if (event.job_id === state.panelJob) refreshWorkersSoon();
  refreshUsageSoon();
}

// --- the job panel ---------------------------------------------------------------------------

state.panelSubtree = new Set();

function section(title, ...content) {
  return h("section", { class: "panel-section" }, h("h3", {}, title), ...content);
}

async function openPanel(jobId) {
  const token = ++state.panelToken;
  state.panelJob = jobId || null;
  state.workers.clear();
  state.panelSubtree = new Set();
  state.timelineAfter = 0;
  state.resultShown = null;
  markSelected();
  const panel = $("#panel");
  if (!jobId) {
    panel.hidden = true;
    document.body.dataset.panel = "";
    return;
  }
  panel.hidden = false;
  $("#panel-title").textContent = jobId;
  $("#panel-body").replaceChildren(h("p", { class: "hint" }, "Loading…"));
  let job;
  try {
    job = await api(`/api/jobs/${enc(jobId)}`);
  } catch (error) {
    if (token !== state.panelToken) return;
    $("#panel-body").replaceChildren(h("p", { class: "empty" }, `Cannot show ${jobId}: ${error.message}`));
    return;
  }
  if (token !== state.panelToken) return;
  state.jobs.set(job.id, { ...(state.jobs.get(job.id) || {}), ...job });
  const body = $("#panel-body");
  body.replaceChildren(
    h(
      "div",
      { class: "panel-status" },
      statusBadge(job.status, job.id),
      h("span", { class: "reason", dataset: { reasonOf: job.id } }, job.status_reason || ""),
      h("span", { class: "spacer" }),
      h("button", { type: "button", class: "small danger", id: "cancel-job", dataset: { action: "cancel" }, disabled: FINAL_JOB.has(job.status) }, "Cancel tree…"),
    ),
    h("p", { class: "task-full" }, job.task_description),
    section("Tree", h("div", { id: "panel-parents", class: "crumbs" }), h("ul", { id: "panel-children", class: "mini-tree" })),
    section("Workers", h("table", { class: "workers" }, h("thead", {}, h("tr", {}, ["Worker", "Status", "Branch / commit", "Changes", ""].map((t) => h("th", {}, t)))), h("tbody", { id: "workers" }))),
    ...(job.repository ? [section("Result", h("div", { id: "result", class: "result" }, h("p", { class: "hint" }, "Not integrated yet: the result branch is written once every worker and sub-job has completed.")))] : []),
    section("Cost and tokens", h("div", { id: "usage", class: "usage" }, "…")),
    section("Details", detailsOf(job)),
    section("Timeline", h("ol", { id: "timeline", class: "timeline" })),
  );
  document.body.dataset.panel = job.id;
  loadParents(job, token);
  loadPanelChildren();
  loadWorkers(token);
  loadUsage();
  loadTimeline(job.id, token);
  if (hasResult(job)) loadResult(job.id);
}

// A result exists once the engine has integrated the job: its COMPLETED reason names the result
// branch ("... result on orchestrator/<job>/result"), a FAILED one the conflict that stopped it
// (the partial result is kept). Asking before would only log a 404 in the console.
function hasResult(job) {
  const reason = job.status_reason || "";
  return Boolean(job.repository) && ((job.status === "COMPLETED" && reason.includes("result on ")) || (job.status === "FAILED" && reason.startsWith("merge conflict")));
}

// --- the job's result: its result branch, what was merged, conflicts, the diff per file ----------

state.resultShown = null; // the result commit on screen (re-read only when it changes)

async function loadResult(jobId) {
  const box = $("#result");
  if (!box || jobId !== state.panelJob) return;
  let result;
  try {
    result = await api(`/api/jobs/${enc(jobId)}/result`);
  } catch (error) {
    if (jobId !== state.panelJob) return;
    state.resultShown = null;
    const text = error.status === 404 ? "Not integrated yet: the result branch is written once every worker and sub-job has completed." : `Cannot read the result: ${error.message}`;
    box.replaceChildren(h("p", { class: "hint" }, text));
    return;
  }
  if (jobId !== state.panelJob || state.resultShown === `${jobId}@${result.commit}`) return;
  state.resultShown = `${jobId}@${result.commit}`;
  let diff = "";
  let truncated = false;
  try {
    const response = await api(`/api/jobs/${enc(jobId)}/diff`, { raw: true });
    diff = await response.text();
    truncated = response.headers.get("X-Diff-Truncated") === "true";
  } catch (error) {
    diff = "";
  }
  if (jobId !== state.panelJob) return;
  box.replaceChildren(...resultView(result, diff, truncated));
}

function resultView(result, diff, truncated) {
  const parts = [
    h(
      "dl",
      { class: "details", id: "result-summary" },
      h("dt", {}, "Branch"), h("dd", {}, h("code", { id: "result-branch" }, result.branch)),
      h("dt", {}, "Commit"), h("dd", {}, h("code", { id: "result-commit", title: result.commit }, (result.commit || "").slice(0, 12))),
      h("dt", {}, "Base"), h("dd", {}, h("code", { title: result.base_commit || "" }, (result.base_commit || "").slice(0, 12))),
      h("dt", {}, "Changes"), h("dd", { id: "result-stat" }, `${result.files_changed} file(s), `, h("span", { class: "add" }, `+${result.insertions}`), " ", h("span", { class: "del" }, `-${result.deletions}`)),
    ),
  ];
  if (result.status === "failed") parts.push(h("p", { class: "result-failed" }, result.reason || "integration failed"));
  parts.push(
    h("h4", {}, `Merged branches (${result.merged.length})`),
    h("ul", { class: "merged", id: "result-merged" }, result.merged.map((m) => h("li", {}, h("code", {}, m.branch), " ", h("span", { class: "muted" }, m.merge_commit ? `${m.commit.slice(0, 10)} → ${m.merge_commit.slice(0, 10)}` : `${m.commit.slice(0, 10)} (already in)`)))),
  );
  if (result.conflicts.length) {
    parts.push(
      h("h4", {}, `Conflicts (${result.conflicts.length})`),
      h("ul", { class: "conflicts", id: "result-conflicts" }, result.conflicts.map((c) => h("li", {}, h("code", {}, (c.files || []).join(", ")), `: ${c.branch} into ${c.into} — `, h("strong", { class: c.resolution ? "ok" : "bad" }, c.resolution ? `resolved by ${c.resolver}` : `unresolved${c.reason ? ` (${c.reason})` : ""}`)))),
    );
  }
  const files = splitDiff(diff);
  parts.push(h("h4", {}, `Diff (${files.length} file(s))${truncated ? " — cut, too large" : ""}`));
  parts.push(h("div", { class: "diff", id: "result-diff" }, files.map((f) => fileDiff(f, files.length <= 5))));
  return parts;
}

function splitDiff(text) {
  const files = [];
  for (const line of text.split("\n")) {
    if (line.startsWith("diff --git ")) {
      const name = line.replace(/^diff --git a\/(.*?) b\/.*$/, "$1");
      files.push({ name, lines: [], add: 0, del: 0 });
    } else if (files.length) {
      const file = files[files.length - 1];
      file.lines.push(line);
      if (line.startsWith("+") && !line.startsWith("+++")) file.add++;
      if (line.startsWith("-") && !line.startsWith("---")) file.del++;
    }
  }
  return files;
}

function fileDiff(file, open) {
  const lines = file.lines.map((line) => {
    let cls = "ctx";
    if (line.startsWith("+++") || line.startsWith("---") || line.startsWith("index ") || line.startsWith("new file") || line.startsWith("deleted file")) cls = "meta";
    else if (line.startsWith("@@")) cls = "hunk";
    else if (line.startsWith("+")) cls = "add";
    else if (line.startsWith("-")) cls = "del";
    return h("span", { class: `line ${cls}` }, `${line}\n`);
  });
  return h(
    "details",
    { class: "file-diff", open, dataset: { path: file.name } },
    h("summary", {}, h("code", {}, file.name), " ", h("span", { class: "add" }, `+${file.add}`), " ", h("span", { class: "del" }, `-${file.del}`)),
    h("pre", {}, ...lines),
  );
}

function detailsOf(job) {
  const rows = [
    ["Agent", job.agent],
    ["Options", Object.keys(job.agent_options || {}).length ? JSON.stringify(job.agent_options) : "—"],
    ["Workers", job.worker_count],
    ["Depth", job.depth],
    ["Priority", job.priority],
    ["Repository", job.repository ? `${job.repository}${job.base_ref ? ` @ ${job.base_ref}` : ""}` : "—"],
    ["Timeout", job.timeout_seconds ? `${job.timeout_seconds} s` : "—"],
    ["Budget", job.max_cost_usd ? `$${job.max_cost_usd}` : "—"],
    ["Created", shortTime(job.created_at)],
    ["Started", shortTime(job.started_at) || "—"],
    ["Finished", shortTime(job.finished_at) || "—"],
    ["Took", job.started_at && job.finished_at ? `${((new Date(job.finished_at) - new Date(job.started_at)) / 1000).toFixed(1)} s` : "—"],
  ];
  return h("dl", { id: "details", class: "details" }, rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]));
}

const refreshPanelJob = debounce(async () => {
  const jobId = state.panelJob;
  if (!jobId) return;
  try {
    const job = await api(`/api/jobs/${enc(jobId)}`);
    if (jobId !== state.panelJob) return;
    state.jobs.set(job.id, { ...(state.jobs.get(job.id) || {}), ...job });
    patchJobStatus(job.id, job.status, job.status_reason);
    const details = $("#details");
    if (details) details.replaceWith(detailsOf(job));
    const cancel = $("#cancel-job");
    if (cancel) cancel.disabled = FINAL_JOB.has(job.status);
    if (hasResult(job)) loadResult(job.id);
  } catch (_) {
    /* the next event tries again */
  }
}, 300);

async function loadParents(job, token) {
  const chain = [];
  let parentId = job.parent_job_id;
  try {
    while (parentId && chain.length < 50) {
      const parent = state.jobs.get(parentId)?.path ? state.jobs.get(parentId) : await api(`/api/jobs/${enc(parentId)}`);
      chain.unshift(parent);
      parentId = parent.parent_job_id;
    }
  } catch (_) {
    /* a worker token cannot see above its subtree */
  }
  if (token !== state.panelToken) return;
  const crumbs = $("#panel-parents");
  if (!crumbs) return;
  crumbs.replaceChildren(
    ...chain.flatMap((p) => [h("a", { href: urlOf({ ...state.view, job: p.id, worker: "" }), class: "mono", dataset: { nav: "job", jobId: p.id } }, p.id), " › "]),
    h("b", { class: "mono" }, job.id),
  );
}

const loadPanelChildren = debounce(async () => {
  const jobId = state.panelJob;
  if (!jobId) return;
  try {
    const list = await api(`/api/jobs?parent_job_id=${enc(jobId)}&limit=1000`);
    if (jobId !== state.panelJob) return;
    for (const child of list.jobs) {
      state.panelSubtree.add(child.id);
      if (!state.jobs.has(child.id)) state.jobs.set(child.id, child);
    }
    const box = $("#panel-children");
    if (!box) return;
    const have = new Map($$(":scope > li", box).map((li) => [li.dataset.jobId, li]));
    const items = list.jobs.reverse().map((child) => {
      const existing = have.get(child.id);
      if (existing) return existing; // patched in place by the streams
      return h(
        "li",
        { dataset: { jobId: child.id } },
        statusBadge(child.status, child.id),
        " ",
        h("a", { href: urlOf({ ...state.view, job: child.id, worker: "" }), class: "mono", dataset: { nav: "job", jobId: child.id } }, child.id),
        " ",
        h("span", { class: "task" }, child.task_description),
        " ",
        h("span", { class: "reason", dataset: { reasonOf: child.id } }, reasonText(child)),
      );
    });
    box.replaceChildren(...(items.length ? items : [h("li", { class: "hint" }, "no sub-jobs")]));
  } catch (error) {
    reportError("Loading sub-jobs", error);
  }
}, 100);

async function loadWorkers(token) {
  const jobId = state.panelJob;
  try {
    const list = await api(`/api/supervisor/workers?job_id=${enc(jobId)}&limit=1000`);
    if (token !== undefined && token !== state.panelToken) return;
    if (jobId !== state.panelJob) return;
    const body = $("#workers");
    if (!body) return;
    list.workers.sort((a, b) => a.worker_index - b.worker_index);
    for (const worker of list.workers) {
      state.workers.set(worker.id, worker);
      const row = $(`tr[data-worker-id="${CSS.escape(worker.id)}"]`, body);
      if (row) patchWorkerRow(row, worker);
      else body.append(workerRow(worker));
    }
    $(":scope > tr.empty", body)?.remove();
    if (!list.workers.length && !$(":scope > tr", body)) body.append(h("tr", { class: "empty" }, h("td", { colspan: "5" }, "No workers yet.")));
    markLogWorker();
  } catch (error) {
    const body = $("#workers");
    if (body && error.status === 403) body.replaceChildren(h("tr", { class: "empty" }, h("td", { colspan: "5" }, "This token cannot read workers (supervisor:read).")));
    else reportError("Loading workers", error);
  }
}
const refreshWorkersSoon = debounce(() => loadWorkers(), 250);

function workerRow(worker) {
  const button = (action, label, cls = "small") => h("button", { type: "button", class: cls, dataset: { action } }, label);
  const row = h(
    "tr",
    { dataset: { workerId: worker.id, jobId: worker.job_id, status: worker.status } },
    h("td", { class: "mono" }, worker.id, h("div", { class: "hint" }, `#${worker.worker_index} · ${worker.agent}`)),
    h("td", {}, h("span", { class: "status", dataset: { status: worker.status, workerStatusOf: worker.id } }, worker.status), h("div", { class: "reason worker-reason" })),
    h("td", { class: "mono git" }),
    h("td", { class: "mono diffstat" }),
    h("td", { class: "actions" }, button("log", "Log"), button("pause", "Pause"), button("resume", "Resume"), button("terminate", "Terminate…", "small danger")),
  );
  patchWorkerRow(row, worker);
  return row;
}

function patchWorkerRow(row, worker) {
  row.dataset.status = worker.status;
  const badge = $(".status", row);
  badge.textContent = worker.status;
  badge.dataset.status = worker.status;
  $(".worker-reason", row).textContent = worker.status_reason || "";
  const git = [worker.branch, worker.commit ? worker.commit.slice(0, 10) : null].filter(Boolean).join(" @ ");
  $(".git", row).textContent = git || "—";
  $(".diffstat", row).textContent = worker.diff_stat ? worker.diff_stat.trim().split("\n").at(-1) : "—";
  $(".diffstat", row).title = worker.diff_stat || "";
  updateWorkerButtons(row, worker);
}

function updateWorkerButtons(row, worker) {
  $('button[data-action="pause"]', row).disabled = worker.status !== "RUNNING";
  $('button[data-action="resume"]', row).disabled = worker.status !== "PAUSED";
  $('button[data-action="terminate"]', row).disabled = FINAL_WORKER.has(worker.status);
}

function markLogWorker() {
  for (const row of $$("#workers tr[data-worker-id]")) row.classList.toggle("selected", row.dataset.workerId === state.logWorker);
}

async function loadUsage() {
  const jobId = state.panelJob;
  try {
    const usage = await api(`/api/jobs/${enc(jobId)}/usage`);
    if (jobId !== state.panelJob || !$("#usage")) return;
    const budget = usage.max_cost_usd ? ` of $${usage.max_cost_usd.toFixed(2)} (left $${(usage.remaining_usd ?? 0).toFixed(2)})` : "";
    $("#usage").replaceChildren(
      h("span", {}, h("b", {}, `$${usage.cost_usd.toFixed(4)}`), budget),
      h("span", {}, `${usage.input_tokens.toLocaleString("en")} in / ${usage.output_tokens.toLocaleString("en")} out tokens`),
      h("span", {}, `${usage.jobs} job${usage.jobs === 1 ? "" : "s"}, ${usage.workers.length} worker${usage.workers.length === 1 ? "" : "s"} in the tree`),
    );
    for (const w of usage.workers) state.panelSubtree.add(w.job_id);
  } catch (error) {
    if ($("#usage")) $("#usage").textContent = `unavailable (${error.message})`;
  }
}
const refreshUsageSoon = debounce(loadUsage, 1000);

function timelineItem(event) {
  const what = event.to_status ? `${event.from_status || "—"} → ${event.to_status}` : event.kind;
  const who = event.worker_id ? `${event.worker_id}` : event.job_id;
  return h(
    "li",
    { dataset: { eventId: String(event.id), kind: event.kind } },
    h("time", { datetime: event.created_at }, new Date(event.created_at).toLocaleTimeString()),
    h("span", { class: "mono" }, who),
    h("span", {}, what),
    event.reason ? h("span", { class: "hint" }, event.reason) : null,
  );
}

async function loadTimeline(jobId, token) {
  try {
    const events = await api(`/api/jobs/${enc(jobId)}/events?after_id=${state.timelineAfter || 0}&limit=1000`);
    if (token !== state.panelToken || jobId !== state.panelJob) return;
    const list = $("#timeline");
    if (!list) return;
    for (const event of events.events) {
      if (!$(`li[data-event-id="${event.id}"]`, list)) list.append(timelineItem(event));
      state.timelineAfter = Math.max(state.timelineAfter || 0, event.id);
    }
  } catch (error) {
    reportError("Loading events", error);
  }
}
// The fleet stream says when the panel's tree changed; the timeline then reads what is new.
const refreshTimelineSoon = debounce(() => loadTimeline(state.panelJob, state.panelToken), 300);

function touchesPanel(event) {
  const jobId = event.job_id;
  return Boolean(state.panelJob) && (jobId === state.panelJob || event.parent_job_id === state.panelJob || state.panelSubtree.has(jobId));
}

// --- the log pane ------------------------------------------------------------------------------

function openLog(workerId) {
  if (state.logStream) state.logStream.abort();
  state.logStream = null;
  state.logWorker = workerId || null;
  markLogWorker();
  const pane = $("#log");
  if (!workerId) {
    pane.hidden = true;
    document.body.dataset.log = "";
    return;
  }
  pane.hidden = false;
  document.body.dataset.log = workerId;
  const lines = $("#log-lines");
  lines.textContent = "";
  $("#log-title").textContent = `— ${workerId}`;
  const controller = new AbortController();
  state.logStream = controller;
  const append = (text, cls) => {
    lines.append(cls ? h("span", { class: cls }, text + "\n") : text + "\n");
    if ($("#log-autoscroll").checked) lines.scrollTop = lines.scrollHeight;
  };
  follow(`/api/supervisor/workers/${enc(workerId)}/logs?follow=true`, controller, (message) => {
    const data = JSON.parse(message.data || "{}");
    if (message.event === "log") append(data.text);
    else if (message.event === "status") append(`— status ${data.status}${data.status_reason ? ` (${data.status_reason})` : ""}`, "note");
    else if (message.event === "end") append(`— end of log: worker ${data.status}, ${data.lines} lines`, "note");
  }).catch(() => {});
}

// --- actions ------------------------------------------------------------------------------------

function confirmDialog(title, text, okLabel) {
  const dialog = $("#confirm");
  $("#confirm-title").textContent = title;
  $("#confirm-text").textContent = text;
  $("#confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  dialog.showModal();
  $("#confirm-cancel").focus();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

async function terminateWorker(workerId) {
  const worker = state.workers.get(workerId);
  const text = `Terminate worker ${workerId} of job ${worker ? worker.job_id : "?"} (${worker ? worker.status : "?"}): its agent process is stopped (SIGTERM, then SIGKILL) and its unfinished work is lost. The job's other workers keep running.`;
  if (!(await confirmDialog(`Terminate ${workerId}?`, text, "Terminate"))) return;
  await workerAction(workerId, "terminate");
}

async function workerAction(workerId, action) {
  try {
    const worker = await api(`/api/supervisor/workers/${enc(workerId)}/${action}`, { method: "POST" });
    state.workers.set(worker.id, worker);
    const row = $(`#workers tr[data-worker-id="${CSS.escape(worker.id)}"]`);
    if (row) patchWorkerRow(row, worker);
    clearMessage();
  } catch (error) {
    reportError(`${action} ${workerId}`, error);
  }
}

async function cancelTree(jobId) {
  let text = `Cancel ${jobId}: it stops and its live workers are terminated.`;
  try {
    const usage = await api(`/api/jobs/${enc(jobId)}/usage`);
    const live = usage.workers.filter((w) => !FINAL_WORKER.has(w.status)).length;
    const subJobs = usage.jobs - 1;
    const jobsText = subJobs ? ` and its ${subJobs} sub-job${subJobs === 1 ? "" : "s"}` : "";
    text = `Cancel ${jobId}${jobsText}: every unfinished job of the tree is canceled and ${live} live worker${live === 1 ? "" : "s"} will be terminated.`;
  } catch (_) {
    /* the shorter text */
  }
  if (!(await confirmDialog(`Cancel ${jobId}?`, text, "Cancel the tree"))) return;
  try {
    const job = await api(`/api/jobs/${enc(jobId)}/cancel`, { method: "POST" });
    patchJobStatus(job.id, job.status, job.status_reason);
    refreshPanelJob();
    clearMessage();
  } catch (error) {
    reportError(`Cancel ${jobId}`, error);
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
    document.body.dataset.lastJob = job.id;
    $("#submit-dialog").close();
    showMessage(`Submitted ${job.id}.`, "info");
    navigate({ job: job.id, worker: "" });
  } catch (error) {
    reportError("Submit", error);
  } finally {
    $("#f-submit").disabled = false;
  }
}

// --- slots per depth ------------------------------------------------------------------------------

async function loadQuotas() {
  try {
    const usage = await api("/api/resources/usage");
    const box = $("#quotas");
    for (const u of usage.usage) {
      let item = $(`.quota[data-depth="${u.depth}"]`, box);
      if (!item) {
        item = h("span", { class: "quota", dataset: { depth: String(u.depth) }, title: `worker slots in use at depth ${u.depth}` }, `d${u.depth} `, h("meter", { min: "0" }), h("span", { class: "meta" }));
        box.append(item);
      }
      const max = u.max_workers ?? u.allocated + u.available;
      const meter = $("meter", item);
      meter.max = max || 1;
      meter.value = u.allocated;
      $(".meta", item).textContent = `${u.allocated} / ${max}`;
    }
  } catch (error) {
    if (error.status === 403) $("#quotas").textContent = "";
  }
}
const loadQuotasSoon = debounce(loadQuotas, 500);

// --- keyboard --------------------------------------------------------------------------------------

function visibleLines() {
  return $$("#jobs .job-line").filter((line) => line.offsetParent !== null);
}

function onListKey(event) {
  const line = event.target.closest(".job-line");
  if (!line) return;
  const li = line.parentElement;
  const lines = visibleLines();
  const index = lines.indexOf(line);
  const focus = (el) => {
    if (el) {
      el.focus();
      el.scrollIntoView({ block: "nearest" });
    }
  };
  switch (event.key) {
    case "ArrowDown": focus(lines[index + 1]); break;
    case "ArrowUp": focus(lines[index - 1]); break;
    case "Home": focus(lines[0]); break;
    case "End": focus(lines.at(-1)); break;
    case "ArrowRight":
      if (li.getAttribute("aria-expanded") === "false") expand(li);
      else focus($(":scope > ul.children > li > .job-line", li));
      break;
    case "ArrowLeft":
      if (li.getAttribute("aria-expanded") === "true") collapse(li);
      else focus(li.parentElement.closest("li.job")?.querySelector(":scope > .job-line"));
      break;
    case "Enter":
    case " ":
      navigate({ job: line.dataset.jobId, worker: "" });
      break;
    case "PageDown": if (!$("#page-next").disabled) navigate({ page: String(Number(state.view.page || 1) + 1) }); break;
    case "PageUp": if (!$("#page-prev").disabled) navigate({ page: String(Number(state.view.page || 1) - 1) }); break;
    default: return;
  }
  event.preventDefault();
}

function onGlobalKey(event) {
  if (event.defaultPrevented || $("dialog[open]")) return;
  const typing = event.target.matches("input, textarea, select");
  if (event.key === "/" && !typing) {
    event.preventDefault();
    $("#q").focus();
  } else if (event.key === "Escape") {
    if (typing && event.target.id === "q" && event.target.value) return;
    if (state.view.worker) navigate({ worker: "" });
    else if (state.view.job) {
      const jobId = state.view.job;
      navigate({ job: "" });
      $(`#jobs .job-line[data-job-id="${CSS.escape(jobId)}"]`)?.focus();
    }
  }
}

// --- start ------------------------------------------------------------------------------------------

function stopStreams() {
  for (const stream of [state.fleet, state.logStream]) if (stream) stream.abort();
  state.fleet = state.logStream = null;
}

function connect() {
  stopStreams();
  state.authFailed = false;
  state.listLoaded = false;
  state.panelJob = state.logWorker = undefined;
  if (!state.token) {
    setConnection("disconnected", "not connected");
    showMessage("Enter an API token (create one with `orchestrator token`) to use the dashboard.", "info");
    $("#jobs").replaceChildren(h("li", { class: "empty" }, "Connect with a token to see jobs."));
    return;
  }
  clearMessage();
  setConnection("disconnected", "connecting…");
  startFleet();
  loadQuotas();
  show(viewFromUrl());
}

function wire() {
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
    connect();
  });
  $("#new-job").addEventListener("click", () => $("#submit-dialog").showModal());
  $("#f-cancel").addEventListener("click", () => $("#submit-dialog").close());
  $("#submit-form").addEventListener("submit", submitJob);

  const searchSoon = debounce(() => navigate({ q: $("#q").value.trim(), page: "1" }, { replace: Boolean(state.view.q) && Boolean($("#q").value.trim()) }), 300);
  $("#q").addEventListener("input", searchSoon);
  for (const id of ["#flt-depth", "#flt-agent", "#flt-repo", "#flt-after", "#flt-before", "#flt-flat"]) {
    $(id).addEventListener("change", filtersChanged);
  }
  $("#flt-clear").addEventListener("click", () => navigate(Object.fromEntries([...FILTER_KEYS.map((k) => [k, ""]), ["page", "1"]])));
  buildCounts();
  $("#counts").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-status]");
    if (button) navigate({ status: button.dataset.status, page: "1" });
  });
  $("#page-prev").addEventListener("click", () => navigate({ page: String(Math.max(1, Number(state.view.page || 1) - 1)) }));
  $("#page-next").addEventListener("click", () => navigate({ page: String(Number(state.view.page || 1) + 1) }));
  $("#new-jobs-show").addEventListener("click", () => loadList());

  const list = $("#jobs");
  list.addEventListener("click", (event) => {
    const toggle = event.target.closest("button.toggle");
    const li = event.target.closest("li.job");
    if (!li) return;
    if (toggle) {
      if (li.getAttribute("aria-expanded") === "true") collapse(li);
      else expand(li);
      return;
    }
    navigate({ job: li.dataset.jobId, worker: "" });
  });
  list.addEventListener("keydown", onListKey);

  $("#panel-close").addEventListener("click", () => navigate({ job: "", worker: "" }));
  $("#log-close").addEventListener("click", () => navigate({ worker: "" }));
  $("#panel").addEventListener("click", (event) => {
    const link = event.target.closest("a[data-nav]");
    if (link && !event.ctrlKey && !event.metaKey && !event.shiftKey) {
      event.preventDefault();
      navigate({ job: link.dataset.jobId, worker: "" });
      return;
    }
    const button = event.target.closest("button[data-action]");
    if (!button || button.disabled) return;
    const action = button.dataset.action;
    if (action === "cancel") cancelTree(state.panelJob);
    const row = button.closest("tr[data-worker-id]");
    if (!row) return;
    const workerId = row.dataset.workerId;
    if (action === "log") navigate({ worker: workerId });
    else if (action === "terminate") terminateWorker(workerId);
    else if (action === "pause" || action === "resume") workerAction(workerId, action);
  });
  document.addEventListener("keydown", onGlobalKey);
  // A browser opens few connections per server (6 over HTTP/1.1, across tabs): close the streams
  // with the page rather than when the browser gets round to it.
  window.addEventListener("pagehide", stopStreams);
  window.addEventListener("popstate", () => show(viewFromUrl()));
  connect();
}

document.addEventListener("DOMContentLoaded", wire);
