// sagaway admin dashboard: a vanilla ES module, no build step, no network but the admin API.
//
// Routes (hash):  #/runs?status=FAILED&saga=place_order&stuck=true&since=24h   the run list
//                 #/runs/<id>                                                  one run
// Every request goes to the admin API next to this page (api/...), with
// "Authorization: Bearer <token>" when a token was given (kept in sessionStorage).

const STATUSES = ["PENDING", "RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED", "FAILED",
  "RESOLVED"];
const ACTIVE = new Set(["PENDING", "RUNNING", "COMPENSATING"]);
const TOKEN_KEY = "sagaway.admin.token";
const PAGE_SIZE = 50;

const ACTIONS = {
  retry: {
    label: "Retry", statuses: ["FAILED"], primary: true,
    help: "Give the failed compensations (or the step that gave up after the pivot) a fresh retry budget.",
  },
  resume: {
    label: "Resume now", statuses: ["PENDING", "RUNNING", "COMPENSATING"],
    help: "Take the run from its worker and fire its timers now.",
  },
  compensate: {
    label: "Compensate", statuses: ["PENDING", "RUNNING", "FAILED"], confirm: true, danger: true,
    help: "Cut the actions in flight and undo every step that may have taken effect.",
  },
  resolve: {
    label: "Mark resolved", statuses: ["FAILED"], confirm: true,
    help: "Someone settled it by hand: the run ends RESOLVED, nothing is invoked.",
  },
};

const SINCE = { "": "Any time", "1h": "Last hour", "24h": "Last 24 hours", "7d": "Last 7 days",
  "30d": "Last 30 days" };
const SINCE_SECONDS = { "1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400 };

const $app = document.getElementById("app");
const $who = document.getElementById("who");

// ---------------------------------------------------------------------------------- DOM helpers

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  add(el, kids);
  return el;
}

function add(el, kids) {
  for (const k of kids.flat(Infinity)) {
    if (k == null || k === false) continue;
    el.append(k instanceof Node ? k : String(k));
  }
  return el;
}

const ICONS = {
  copy: '<svg viewBox="0 0 16 16" width="14" height="14" aria-hidden="true"><rect x="5" y="5" width="9" height="9" rx="2" fill="none" stroke="currentColor" stroke-width="1.5"/><path d="M11 5V3.5A1.5 1.5 0 0 0 9.5 2h-6A1.5 1.5 0 0 0 2 3.5v6A1.5 1.5 0 0 0 3.5 11H5" fill="none" stroke="currentColor" stroke-width="1.5"/></svg>',
  check: '<svg viewBox="0 0 16 16" width="14" height="14" aria-hidden="true"><path d="M3 8.5l3 3 7-7" fill="none" stroke="currentColor" stroke-width="1.8" stroke-linecap="round" stroke-linejoin="round"/></svg>',
  back: '<svg viewBox="0 0 16 16" width="14" height="14" aria-hidden="true"><path d="M10 3L5 8l5 5" fill="none" stroke="currentColor" stroke-width="1.8" stroke-linecap="round" stroke-linejoin="round"/></svg>',
  refresh: '<svg viewBox="0 0 16 16" width="14" height="14" aria-hidden="true"><path d="M13.5 8a5.5 5.5 0 1 1-1.6-3.9M13.5 2.5v3h-3" fill="none" stroke="currentColor" stroke-width="1.6" stroke-linecap="round" stroke-linejoin="round"/></svg>',
  clock: '<svg viewBox="0 0 16 16" width="14" height="14" aria-hidden="true"><circle cx="8" cy="8" r="6" fill="none" stroke="currentColor" stroke-width="1.5"/><path d="M8 4.5V8l2.5 1.5" fill="none" stroke="currentColor" stroke-width="1.5" stroke-linecap="round"/></svg>',
  close: '<svg viewBox="0 0 16 16" width="12" height="12" aria-hidden="true"><path d="M4 4l8 8M12 4l-8 8" stroke="currentColor" stroke-width="1.8" stroke-linecap="round"/></svg>',
};

function icon(name, cls = "icon") {
  const span = h("span", { class: cls, "aria-hidden": "true" });
  span.innerHTML = ICONS[name]; // constant markup, never data
  return span;
}

// ----------------------------------------------------------------------------------- formatting

const pad = (n, w = 2) => String(n).padStart(w, "0");

function fmtClock(t, ms = false) {
  const d = new Date(t * 1000);
  const base = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return ms ? `${base}.${pad(d.getMilliseconds(), 3)}` : base;
}

function fmtDate(t) {
  const d = new Date(t * 1000);
  const month = d.toLocaleString("en", { month: "short" });
  const now = new Date();
  const year = d.getFullYear() === now.getFullYear() ? "" : ` ${d.getFullYear()}`;
  return `${month} ${d.getDate()}${year}, ${fmtClock(t)}`;
}

function fmtDur(s) {
  if (s == null || !Number.isFinite(s)) return "—";
  s = Math.max(0, s);
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 10) return `${s.toFixed(2)} s`;
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${pad(Math.floor(s % 60))}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

function fmtOffset(s) {
  if (s < 1) return `+${Math.round(s * 1000)} ms`;
  if (s < 60) return `+${Number(s.toFixed(2))} s`;
  return `+${fmtDur(s)}`;
}

function rel(t) {
  const s = Date.now() / 1000 - t;
  if (s < -5) return `in ${fmtDur(-s)}`;
  if (s < 5) return "just now";
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function relEl(t, cls = "rel") {
  return h("time", { class: cls, "data-rel": t, datetime: new Date(t * 1000).toISOString(),
    title: fmtDate(t) }, rel(t));
}

setInterval(() => {
  for (const el of document.querySelectorAll("[data-rel]")) el.textContent = rel(+el.dataset.rel);
}, 10_000);

const title = (s) => s.charAt(0) + s.slice(1).toLowerCase();

function shortId(id) {
  // Run ids are UUIDv7: the first digits are a timestamp shared by neighbours, the tail is random.
  return id.length > 12 ? `…${id.slice(-8)}` : id;
}

function pill(status, extra = "") {
  return h("span", { class: `pill s-${status} ${extra}`, "data-status": status },
    h("span", { class: "dot" }), title(status));
}

function kindBadge(kind) {
  if (kind === "pivot") {
    return h("span", { class: "badge pivot", title: "The pivot: the point of no return. After it the saga only goes forward." },
      h("span", { class: "diamond" }), "pivot");
  }
  if (kind === "retriable") {
    return h("span", { class: "badge retriable", title: "After the pivot: retried until it succeeds, never compensated." }, "retriable");
  }
  return null;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = h("textarea", { class: "offscreen" });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  if (button) {
    button.classList.add("copied");
    button.replaceChildren(icon("check"), h("span", {}, "Copied"));
    setTimeout(() => { button.classList.remove("copied"); button.replaceChildren(icon("copy"), h("span", {}, "Copy")); }, 1400);
  }
}

function copyButton(text, label = "Copy") {
  const b = h("button", { class: "btn-copy", type: "button", title: `Copy ${text}` }, icon("copy"), h("span", {}, label));
  b.addEventListener("click", (e) => { e.stopPropagation(); copyText(text, b); });
  return b;
}

// ------------------------------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
    this.detail = detail;
  }
}

function errorDetail(data) {
  if (data == null) return null;
  if (typeof data === "string") return data.trim() || null;
  const d = data.detail ?? data.message ?? data.error;
  if (typeof d === "string") return d;
  if (Array.isArray(d)) {
    return d.map((x) => (x && x.msg ? [(x.loc || []).filter((p) => p !== "body").join("."), x.msg]
      .filter(Boolean).join(": ") : JSON.stringify(x))).join("; ");
  }
  return d == null ? null : JSON.stringify(d);
}

let onUnauthorized = () => {};

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(new URL(path, document.baseURI), {
      method, headers, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "Cannot reach the admin API. Is it running?");
  }
  const text = await res.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = text; }
  }
  if (!res.ok) {
    const detail = errorDetail(data) || `${res.status} ${res.statusText}`;
    if (res.status === 401) onUnauthorized(detail);
    throw new ApiError(res.status, detail);
  }
  return data;
}

// ------------------------------------------------------------------------------ auth and boot

let me = null; // {name, role, auth}
let view = null; // the current view: {route, update?(params), destroy()}
let loginShown = false;

const canOperate = () => !me || !me.auth || me.role === "operator" || me.role === "admin";

function renderWho() {
  $who.replaceChildren();
  if (!me) return;
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (me.auth || token) {
    $who.append(h("span", { class: "who-name", title: "Signed in with a bearer token" }, me.name || "unknown"),
      me.role ? h("span", { class: `role role-${me.role}` }, me.role) : h("span", { class: "role" }, "no role"));
    if (token) {
      $who.append(h("button", {
        class: "link", type: "button", onclick: () => {
          sessionStorage.removeItem(TOKEN_KEY);
          me = null;
          showLogin("Signed out.");
        },
      }, "Sign out"));
    }
  } else {
    $who.append(h("span", { class: "role role-open", title: "The admin API runs without authentication" }, "no auth"));
  }
}

function showLogin(message) {
  loginShown = true;
  view?.destroy();
  view = null;
  tooltip.hide();
  renderWho();
  document.title = "Sign in · sagaway";
  const input = h("input", { type: "password", id: "token", name: "token", autocomplete: "off",
    placeholder: "Bearer token", required: true, "aria-label": "Admin API token" });
  const err = h("p", { class: "form-msg error", hidden: !message }, message || "");
  const form = h("form", { class: "card login" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "This admin API needs a bearer token. It is kept for this browser tab only."),
    h("label", { for: "token" }, "Token"), input, err,
    h("button", { class: "btn primary", type: "submit" }, "Continue"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    loginShown = false;
    await boot();
  });
  $app.replaceChildren(h("div", { class: "login-wrap" }, form));
  input.focus();
}

onUnauthorized = (detail) => {
  const had = sessionStorage.getItem(TOKEN_KEY);
  sessionStorage.removeItem(TOKEN_KEY);
  me = null;
  if (!loginShown) showLogin(had ? `The token was refused: ${detail}` : null);
};

async function boot() {
  try {
    me = await api("api/whoami");
  } catch (e) {
    if (e.status === 401) return; // the login box is up
    if (e.status !== 404) {
      $app.replaceChildren(h("div", { class: "card notice error" },
        h("h2", {}, "The dashboard cannot start"), h("p", {}, e.message),
        h("button", { class: "btn", type: "button", onclick: () => boot() }, "Try again")));
      return;
    }
    me = null; // an API without whoami: act as unauthenticated
  }
  renderWho();
  route();
}

// -------------------------------------------------------------------------------------- router

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/runs";
  const [path, query = ""] = raw.split("?");
  return { path: path.replace(/\/+$/, "") || "/runs", params: new URLSearchParams(query) };
}

function route() {
  if (loginShown) return;
  const { path, params } = parseHash();
  tooltip.hide();
  const runMatch = path.match(/^\/runs\/([^/]+)$/);
  if (path === "/runs") {
    if (view && view.route === "list") return view.update(params);
    view?.destroy();
    view = listView(params);
  } else if (runMatch) {
    view?.destroy();
    view = runView(decodeURIComponent(runMatch[1]));
  } else {
    location.replace("#/runs");
  }
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", true);
}

window.addEventListener("hashchange", route);

// ------------------------------------------------------------------------------------- list view

function readFilters(params) {
  return {
    status: params.getAll("status").flatMap((s) => s.split(",")).map((s) => s.toUpperCase())
      .filter((s) => STATUSES.includes(s)),
    saga: params.get("saga") || "",
    stuck: params.get("stuck") === "true",
    since: SINCE[params.get("since") || ""] ? params.get("since") || "" : "",
  };
}

function filtersHash(f) {
  const q = new URLSearchParams();
  for (const s of f.status) q.append("status", s);
  if (f.saga) q.set("saga", f.saga);
  if (f.stuck) q.set("stuck", "true");
  if (f.since) q.set("since", f.since);
  const qs = q.toString();
  return `#/runs${qs ? `?${qs}` : ""}`;
}

function listView(params) {
  let filters = readFilters(params);
  let alive = true;
  let cursor = null;
  let loaded = 0;
  let seq = 0;
  const sagaNames = new Set();

  const go = (f) => { location.hash = filtersHash(f); };

  const chips = h("div", { class: "chips", role: "group", "aria-label": "Filter by status" });
  const sagaInput = h("input", { type: "search", id: "saga-filter", class: "input", placeholder: "Any saga",
    list: "saga-names", value: filters.saga, autocomplete: "off", spellcheck: "false" });
  const sagaList = h("datalist", { id: "saga-names" });
  const sinceSelect = h("select", { id: "since-filter", class: "input" },
    Object.entries(SINCE).map(([k, v]) => h("option", { value: k, selected: k === filters.since }, v)));
  const stuckBox = h("input", { type: "checkbox", id: "stuck-filter", role: "switch", checked: filters.stuck });
  const clearBtn = h("button", { class: "link", type: "button", onclick: () => go({ status: [], saga: "", stuck: false, since: "" }) }, "Clear filters");
  const summary = h("span", { class: "muted summary" });
  const tbody = h("tbody");
  const empty = h("div", { class: "empty", hidden: true });
  const errorBox = h("div", { class: "notice error", hidden: true });
  const more = h("button", { class: "btn", type: "button", id: "load-more", hidden: true, onclick: () => load(false) }, "Load more");
  const refresh = h("button", { class: "btn ghost", type: "button", title: "Refresh", onclick: () => { loadCounts(); load(true); } }, icon("refresh"), "Refresh");

  let sagaTimer = null;
  sagaInput.addEventListener("input", () => {
    clearTimeout(sagaTimer);
    sagaTimer = setTimeout(() => go({ ...filters, saga: sagaInput.value.trim() }), 450);
  });
  sagaInput.addEventListener("change", () => {
    clearTimeout(sagaTimer);
    go({ ...filters, saga: sagaInput.value.trim() });
  });
  sinceSelect.addEventListener("change", () => go({ ...filters, since: sinceSelect.value }));
  stuckBox.addEventListener("change", () => go({ ...filters, stuck: stuckBox.checked }));

  const root = h("section", { class: "page list-page" },
    h("div", { class: "page-head" },
      h("div", {}, h("h1", {}, "Saga runs"), summary),
      refresh),
    chips,
    h("div", { class: "filters" },
      h("label", { class: "field" }, h("span", {}, "Saga"), sagaInput, sagaList),
      h("label", { class: "field" }, h("span", {}, "Started"), sinceSelect),
      h("label", { class: "toggle", title: "Active runs whose last transition is old: nobody is moving them" },
        stuckBox, h("span", { class: "track" }, h("span", { class: "thumb" })), h("span", {}, "Stuck only")),
      h("span", { class: "spacer" }), clearBtn),
    errorBox,
    h("div", { class: "card table-card" },
      h("table", { class: "runs" },
        h("thead", {}, h("tr", {},
          h("th", { class: "c-id" }, "Run"), h("th", { class: "c-saga" }, "Saga"),
          h("th", { class: "c-status" }, "Status"), h("th", { class: "c-started" }, "Started"),
          h("th", { class: "c-updated" }, "Last change"), h("th", { class: "c-error" }, "Error"))),
        tbody),
      empty),
    h("div", { class: "more" }, more));
  $app.replaceChildren(root);

  function renderChips(counts) {
    const total = counts ? Object.values(counts).reduce((a, b) => a + b, 0) : null;
    const all = h("button", { class: "chip chip-all", type: "button", "aria-pressed": String(filters.status.length === 0),
      onclick: () => go({ ...filters, status: [] }) }, "All", h("span", { class: "count" }, total ?? "–"));
    const items = STATUSES.map((s) => {
      const n = counts ? counts[s] || 0 : null;
      const on = filters.status.includes(s);
      return h("button", {
        class: `chip s-${s}${n === 0 ? " zero" : ""}`, type: "button", "data-status": s, "aria-pressed": String(on),
        title: on ? `Stop filtering on ${title(s)}` : `Show ${title(s).toLowerCase()} runs`,
        onclick: (e) => {
          // A click adds or removes one status; Alt-click shows that status alone.
          const next = e.altKey ? [s] : on ? filters.status.filter((x) => x !== s) : [...filters.status, s];
          go({ ...filters, status: STATUSES.filter((x) => next.includes(x)) });
        },
      }, h("span", { class: "dot" }), title(s), h("span", { class: "count" }, n ?? "–"));
    });
    chips.replaceChildren(all, ...items);
    chips.dataset.counts = counts ? "loaded" : "";
  }

  async function loadCounts() {
    try {
      const data = await api("api/runs/counts");
      if (alive) renderChips(data.counts || {});
    } catch (e) {
      if (alive && e.status !== 401) renderChips(null);
    }
  }

  function row(r) {
    const href = `#/runs/${encodeURIComponent(r.id)}`;
    const tr = h("tr", { class: "run-row", "data-id": r.id, "data-status": r.status },
      h("td", { class: "c-id" }, h("a", { href, class: "mono", title: r.id }, shortId(r.id))),
      h("td", { class: "c-saga" }, h("span", { class: "saga-name" }, r.saga), h("span", { class: "ver" }, `v${r.version}`)),
      h("td", { class: "c-status" }, pill(r.status),
        r.stuck ? h("span", { class: "stuck-tag", title: "Active, but nothing has happened for a while: no worker is moving it" }, "stuck") : null,
        r.request ? h("span", { class: "req-tag", title: `${r.request.action} requested by ${r.request.actor || "?"}: ${r.request.reason || ""}` }, `${r.request.action} requested`) : null),
      h("td", { class: "c-started" }, h("span", { title: rel(r.created_at) }, fmtDate(r.created_at))),
      h("td", { class: "c-updated" }, relEl(r.updated_at)),
      h("td", { class: "c-error" }, r.error ? h("span", { class: "err-snippet", title: r.error }, r.error) : h("span", { class: "faint" }, "—")));
    tr.addEventListener("click", (e) => {
      if (e.target.closest("a")) return;
      if (window.getSelection()?.toString()) return;
      location.hash = href;
    });
    return tr;
  }

  async function load(reset) {
    const mine = ++seq;
    const q = new URLSearchParams();
    for (const s of filters.status) q.append("status", s);
    if (filters.saga) q.set("saga", filters.saga);
    if (filters.stuck) q.set("stuck", "true");
    if (filters.since) q.set("started_from", String(Date.now() / 1000 - SINCE_SECONDS[filters.since]));
    q.set("limit", String(PAGE_SIZE));
    if (!reset && cursor) q.set("cursor", cursor);
    more.disabled = true;
    root.classList.add("busy");
    try {
      const data = await api(`api/runs?${q}`);
      if (!alive || mine !== seq) return;
      errorBox.hidden = true;
      if (reset) { tbody.replaceChildren(); loaded = 0; }
      const runs = data.runs || [];
      add(tbody, runs.map(row));
      loaded += runs.length;
      cursor = data.next_cursor || null;
      for (const r of runs) sagaNames.add(r.saga);
      sagaList.replaceChildren(...[...sagaNames].sort().map((n) => h("option", { value: n })));
      more.hidden = !cursor;
      summary.textContent = loaded === 0 ? "" : `${loaded}${cursor ? "+" : ""} run${loaded === 1 ? "" : "s"}${describe(filters)}`;
      empty.hidden = loaded !== 0;
      empty.replaceChildren(h("p", {}, anyFilter(filters) ? "No runs match these filters." : "No saga runs yet."),
        anyFilter(filters) ? h("button", { class: "btn", type: "button", onclick: () => go({ status: [], saga: "", stuck: false, since: "" }) }, "Clear filters") : null);
      root.dataset.loaded = "true";
    } catch (e) {
      if (!alive || mine !== seq || e.status === 401) return;
      errorBox.hidden = false;
      errorBox.textContent = e.message;
    } finally {
      if (mine === seq) { more.disabled = false; root.classList.remove("busy"); }
    }
  }

  function sync() {
    renderChips(null);
    sinceSelect.value = filters.since;
    stuckBox.checked = filters.stuck;
    if (document.activeElement !== sagaInput) sagaInput.value = filters.saga;
    clearBtn.hidden = !anyFilter(filters);
    document.title = `${filters.status.length ? filters.status.map(title).join(", ") + " runs" : "Runs"} · sagaway`;
  }

  sync();
  loadCounts();
  load(true);
  const timer = setInterval(() => { if (!document.hidden) loadCounts(); }, 15_000);

  return {
    route: "list",
    update(params) {
      filters = readFilters(params);
      sync();
      loadCounts();
      load(true);
    },
    destroy() { alive = false; clearInterval(timer); clearTimeout(sagaTimer); },
  };
}

const anyFilter = (f) => f.status.length > 0 || f.saga || f.stuck || f.since;

function describe(f) {
  const parts = [];
  if (f.saga) parts.push(`saga ${f.saga}`);
  if (f.stuck) parts.push("stuck");
  if (f.since) parts.push(SINCE[f.since].toLowerCase());
  return parts.length ? ` · ${parts.join(" · ")}` : "";
}

// ------------------------------------------------------------------------------------ JSON view

function jsonNode(value, depth = 0, trailing = "") {
  const tail = trailing ? h("span", { class: "j-punct" }, trailing) : null;
  if (value === null) return [h("span", { class: "j-null" }, "null"), tail];
  if (typeof value === "string") return [h("span", { class: "j-str" }, JSON.stringify(value)), tail];
  if (typeof value === "number") return [h("span", { class: "j-num" }, String(value)), tail];
  if (typeof value === "boolean") return [h("span", { class: "j-bool" }, String(value)), tail];
  const isArr = Array.isArray(value);
  const entries = isArr ? value.map((v, i) => [i, v]) : Object.entries(value);
  const [open, close] = isArr ? ["[", "]"] : ["{", "}"];
  if (entries.length === 0) return [h("span", { class: "j-punct" }, open + close), tail];
  const body = h("div", { class: "j-body" }, entries.map(([k, v], i) => h("div", { class: "j-line" },
    isArr ? null : [h("span", { class: "j-key" }, JSON.stringify(k)), h("span", { class: "j-punct" }, ": ")],
    jsonNode(v, depth + 1, i < entries.length - 1 ? "," : ""))));
  const n = entries.length;
  return h("details", { class: "j-node", open: depth < 3 },
    h("summary", {}, h("span", { class: "j-punct" }, open),
      h("span", { class: "j-collapsed" }, ` ${n} ${isArr ? "item" : "key"}${n === 1 ? "" : "s"} `,
        h("span", { class: "j-punct" }, close + trailing))),
    body, h("span", { class: "j-punct j-close" }, close + trailing));
}

function jsonCard(label, value, emptyText) {
  const empty = value == null || (typeof value === "object" && Object.keys(value).length === 0);
  const text = JSON.stringify(value, null, 2);
  return h("details", { class: "card json-card", open: true },
    h("summary", {}, h("h2", {}, label),
      empty ? null : h("span", { class: "muted small" }, `${new Blob([text ?? ""]).size} bytes`),
      empty ? null : copyButton(text, "Copy")),
    empty ? h("p", { class: "faint small pad" }, emptyText) : h("div", { class: "json" }, jsonNode(value)));
}

// ------------------------------------------------------------------------------------- timeline

const KINDS = new Set(["compensatable", "pivot", "retriable"]);

/** The run's steps as a list (the API sends a list in definition order; a dict works too). */
function stepList(run) {
  const raw = run.steps || [];
  const list = Array.isArray(raw) ? raw : Object.entries(raw).map(([name, st]) => ({ name, ...st }));
  return list.map((st) => ({ ...st, kind: KINDS.has(st.kind) ? st.kind : null }));
}

/** Turn a run's history into lanes: per step, forward and compensation attempts as bars. */
function buildTimeline(run, now) {
  const hist = run.history || [];
  const steps = new Map();
  const infos = new Map(stepList(run).map((st) => [st.name, st]));
  const ensure = (name) => {
    if (!steps.has(name)) {
      const info = infos.get(name) || {};
      steps.set(name, { name, kind: info.kind ?? null, state: info,
        fwd: { bars: [], waits: [], marks: [], open: null, wait: null },
        comp: { bars: [], waits: [], marks: [], open: null, wait: null } });
    }
    return steps.get(name);
  };
  for (const name of infos.keys()) ensure(name);
  const runMarks = [];
  const t0 = Math.min(run.created_at ?? Infinity, hist.length ? hist[0].at : Infinity);
  const last = hist.length ? hist[hist.length - 1].at : run.updated_at ?? t0;
  const active = ACTIVE.has(run.status) || !!run.request;
  let end = active ? Math.max(now, last) : Math.max(last, run.updated_at || last);
  if (!(end > t0)) end = t0 + 0.001;
  let pivotAt = null;

  hist.forEach((e, index) => {
    const [family, what] = e.kind.split(".");
    if (!e.step || (family !== "step" && family !== "compensation")) {
      runMarks.push({ ...e, index });
      return;
    }
    const s = ensure(e.step);
    const lane = family === "step" ? s.fwd : s.comp;
    const d = e.data || {};
    const closeWait = (at, how) => {
      if (lane.wait) { lane.waits.push({ ...lane.wait, end: at, how }); lane.wait = null; }
    };
    const closeBar = (outcome) => {
      const open = lane.open && (e.attempt == null || lane.open.attempt === e.attempt) ? lane.open : null;
      if (lane.open && !open) lane.bars.push({ ...lane.open, end: e.at, outcome: "interrupted" });
      lane.open = null;
      lane.bars.push({ attempt: e.attempt ?? open?.attempt, start: open ? open.start : e.at, end: e.at, outcome,
        error: d.error, retryable: d.retryable, maybeApplied: d.maybe_applied, index });
    };
    switch (what) {
      case "started":
        closeWait(e.at, "fired");
        if (lane.open) lane.bars.push({ ...lane.open, end: e.at, outcome: "interrupted" });
        lane.open = { attempt: e.attempt, start: e.at, index };
        break;
      case "succeeded":
        closeBar("ok");
        if (family === "step" && s.kind === "pivot") pivotAt = e.at;
        break;
      case "failed": closeBar("failed"); break;
      case "interrupted": closeBar("interrupted"); break;
      case "retry_scheduled":
        closeWait(e.at, "replaced");
        lane.wait = { start: e.at, due: e.at + (d.delay || 0), attempt: e.attempt, index };
        break;
      case "gave_up":
      case "cancelled":
        closeWait(e.at, what);
        if (lane.open) { lane.bars.push({ ...lane.open, end: e.at, outcome: "interrupted" }); lane.open = null; }
        lane.marks.push({ type: what, at: e.at, attempt: e.attempt, error: d.error, maybeApplied: d.maybe_applied, index });
        break;
      default:
        lane.marks.push({ type: what, at: e.at, attempt: e.attempt, data: d, index });
    }
  });

  for (const s of steps.values()) {
    for (const lane of [s.fwd, s.comp]) {
      if (lane.open) {
        lane.bars.push({ ...lane.open, end: active ? end : last, outcome: active ? "running" : "unknown" });
        lane.open = null;
      }
      if (lane.wait) {
        const w = lane.wait;
        lane.waits.push({ ...w, end: active ? Math.min(Math.max(w.due, w.start), end) : last, how: active ? "pending" : "unfinished" });
        lane.wait = null;
      }
    }
  }
  return { steps: [...steps.values()], runMarks, t0, end, active, pivotAt, now };
}

/** A piecewise-linear time scale. Long quiet gaps (retry backoffs, hung calls, the wait for an
 *  operator) are squeezed into narrow breaks; between breaks, each cluster of activity keeps
 *  a linear scale of its own (its ticks count from its start) and a readable minimum width. */
function makeScale(times, t0, t1, minBreak = 0.07) {
  const pts = [...new Set(times.filter((t) => t >= t0 && t <= t1).concat([t0, t1]))].sort((a, b) => a - b);
  const segs = [];
  for (let i = 0; i + 1 < pts.length; i++) segs.push({ t0: pts[i], t1: pts[i + 1], w: pts[i + 1] - pts[i], brk: false });
  // A gap is squeezed when it is at least 2 s and more than 3x all the smaller gaps together.
  const sorted = segs.map((x) => x.w).sort((a, b) => a - b);
  let small = 0;
  let threshold = Infinity;
  for (const g of sorted) {
    if (small > 0 && g >= 2 && g > 3 * small) { threshold = g; break; }
    small += g;
  }
  for (const sg of segs) sg.brk = sg.w >= threshold;
  const clusters = [];
  let cur = null;
  for (const sg of segs) {
    if (sg.brk) { cur = null; continue; }
    if (!cur) { cur = { segs: [] }; clusters.push(cur); }
    cur.segs.push(sg);
  }
  const widthOf = (c) => c.segs.reduce((acc, sg) => acc + sg.w, 0);
  const active = clusters.reduce((acc, c) => acc + widthOf(c), 0);
  const nBreaks = segs.filter((sg) => sg.brk).length;
  if (nBreaks > 0 && clusters.length > 1) {
    const minShare = Math.min(0.2, 0.6 / clusters.length);
    for (const c of clusters) {
      const w = widthOf(c);
      if (w > 0 && w < minShare * active) for (const sg of c.segs) sg.w *= (minShare * active) / w;
    }
  }
  // Each break gets at least minBreak of the whole width (room for its label).
  const activeNow = clusters.reduce((acc, c) => acc + widthOf(c), 0) || 1;
  const f = Math.min(Math.max(minBreak, 0.05), 0.6 / Math.max(nBreaks, 1));
  const breakW = (f * activeNow) / (1 - nBreaks * f);
  for (const sg of segs) if (sg.brk) sg.w = breakW;
  let x = 0;
  for (const sg of segs) { sg.x0 = x; x += sg.w; sg.x1 = x; }
  const total = x || 1;
  for (const sg of segs) { sg.x0 /= total; sg.x1 /= total; }
  const at = (t) => {
    if (t <= t0) return 0;
    if (t >= t1) return 1;
    let lo = 0;
    let hi = segs.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (segs[mid].t1 < t) lo = mid + 1; else hi = mid;
    }
    const sg = segs[lo];
    return sg.t1 === sg.t0 ? sg.x0 : sg.x0 + ((t - sg.t0) / (sg.t1 - sg.t0)) * (sg.x1 - sg.x0);
  };
  return {
    at,
    breaks: segs.filter((sg) => sg.brk),
    clusters: clusters.map((c) => ({ t0: c.segs[0].t0, t1: c.segs[c.segs.length - 1].t1,
      x0: c.segs[0].x0, x1: c.segs[c.segs.length - 1].x1 })),
  };
}

function niceStep(x) {
  const p = 10 ** Math.floor(Math.log10(x));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= x * 0.999) return m * p;
  return 10 * p;
}

const pct = (f) => `${(f * 100).toFixed(4)}%`;

const OUTCOME = {
  ok: "Succeeded", failed: "Failed", interrupted: "Interrupted (possibly applied)",
  running: "In flight", unknown: "No outcome recorded",
};

function timelineView(run, { width }) {
  const model = buildTimeline(run, Date.now() / 1000);
  const times = [model.t0, model.end];
  for (const s of model.steps) {
    for (const lane of [s.fwd, s.comp]) {
      for (const b of lane.bars) times.push(b.start, b.end);
      for (const w of lane.waits) times.push(w.start, w.end);
      for (const m of lane.marks) times.push(m.at);
    }
  }
  for (const m of model.runMarks) times.push(m.at);
  const W = Math.max(width, 200);
  const scale = makeScale(times, model.t0, model.end, 64 / W);
  const x = (t) => scale.at(t);

  const chart = h("div", { class: "tl", style: `--rows:${model.steps.length}` });

  // Axis.
  const axis = h("div", { class: "tl-track tl-axis" });
  for (const c of scale.clusters) {
    const px = (c.x1 - c.x0) * W;
    const span = c.t1 - c.t0;
    axis.append(h("span", { class: "tick major", style: `left:${pct(c.x0)}` }, h("span", {}, fmtClock(c.t0))));
    if (span <= 0 || px < 80) continue;
    const step = niceStep(span / Math.max(1, Math.floor(px / 84)));
    for (let k = 1; c.t0 + k * step < c.t1 - step * 0.35; k++) {
      axis.append(h("span", { class: "tick", style: `left:${pct(x(c.t0 + k * step))}` }, h("span", {}, fmtOffset(k * step))));
    }
  }
  chart.append(h("div", { class: "tl-label tl-axis-label" }, h("span", { class: "faint small" }, "time")), axis);

  // The run lane: starts, operator actions, compensation switch, finish.
  const runTrack = h("div", { class: "tl-track tl-runlane" });
  const groups = [];
  for (const m of model.runMarks) {
    const px = x(m.at) * W;
    const g = groups.find((gr) => Math.abs(gr.px - px) < 9);
    if (g) g.items.push(m); else groups.push({ px, at: m.at, items: [m] });
  }
  for (const g of groups) {
    const rank = (m) => (m.kind === "run.finished" ? 5 : m.kind.startsWith("operator.") ? 4 : m.kind === "run.compensating" ? 3 : m.kind === "run.recovered" ? 2 : 1);
    const top = [...g.items].sort((a, b) => rank(b) - rank(a))[0];
    const cls = top.kind === "run.finished" ? `fin s-${top.data?.status || run.status}`
      : top.kind.startsWith("operator.") ? "op" : top.kind === "run.compensating" ? "comp"
        : top.kind === "run.recovered" ? "rec" : top.kind === "event.ignored" ? "ign" : "start";
    const mark = h("button", { class: `rmark ${cls}`, type: "button", style: `left:${pct(x(g.at))}`,
      "aria-label": g.items.map((m) => m.kind).join(", ") });
    mark.tip = () => tipRunMarks(run, model, g.items);
    runTrack.append(mark);
  }
  chart.append(h("div", { class: "tl-label tl-runlabel" }, h("span", { class: "lane-name" }, "run"),
    h("span", { class: "faint small" }, "starts · operator · finish")), runTrack);

  // Steps.
  model.steps.forEach((s, i) => {
    const label = h("div", { class: `tl-label tl-step${s.kind === "pivot" ? " is-pivot" : ""}`, "data-step": s.name },
      h("div", { class: "step-line" }, h("span", { class: "step-idx" }, String(i + 1)),
        h("span", { class: "step-name", title: s.name }, s.name), kindBadge(s.kind)),
      h("div", { class: "comp-line faint" }, compCaption(s)));
    const lanes = h("div", { class: `tl-track tl-lanes${s.kind === "pivot" ? " is-pivot" : ""}`, "data-step": s.name });
    const fwd = h("div", { class: "lane fwd" });
    const comp = h("div", { class: "lane comp" });
    for (const [lane, el, family] of [[s.fwd, fwd, "action"], [s.comp, comp, "compensation"]]) {
      for (const w of lane.waits) {
        const el2 = h("div", { class: `wait ${w.how}`, style: `left:${pct(x(w.start))};width:${pct(x(w.end) - x(w.start))}` });
        el2.tip = () => tipWait(run, s, family, w);
        el2.tabIndex = 0;
        el.append(el2);
      }
      for (const b of lane.bars) {
        const wpx = (x(b.end) - x(b.start)) * W;
        const bar = h("button", {
          class: `bar ${family === "action" ? "a" : "c"} o-${b.outcome}`, type: "button",
          style: `left:${pct(x(b.start))};width:${pct(x(b.end) - x(b.start))}`,
          "data-attempt": b.attempt, "data-outcome": b.outcome,
          "aria-label": `${s.name} ${family} attempt ${b.attempt}: ${OUTCOME[b.outcome]}`,
        }, barText(b, wpx - (family === "action" ? 0 : 9)));
        bar.tip = () => tipBar(run, s, family, b, lane);
        el.append(bar);
      }
      for (const m of lane.marks) {
        const mk = h("button", { class: `lmark m-${m.type}`, type: "button", style: `left:${pct(x(m.at))}`,
          "aria-label": `${s.name} ${family} ${m.type}` }, m.type === "gave_up" ? "✕" : m.type === "cancelled" ? "–" : "•");
        mk.tip = () => tipLaneMark(run, s, family, m);
        el.append(mk);
      }
    }
    lanes.append(fwd, comp);
    chart.append(label, lanes);
  });

  // Overlay: squeezed gaps, the point of no return, now.
  const overlay = h("div", { class: "tl-overlay" });
  for (const b of scale.breaks) {
    overlay.append(h("div", { class: "tl-break", style: `left:${pct(b.x0)};width:${pct(b.x1 - b.x0)}`,
      title: `${fmtDur(b.t1 - b.t0)} with nothing happening, squeezed` },
    h("span", {}, fmtDur(b.t1 - b.t0))));
  }
  if (model.pivotAt != null) {
    overlay.append(h("div", { class: "tl-pivot", style: `left:${pct(x(model.pivotAt))}` },
      h("span", { class: "tl-pivot-label" }, h("span", { class: "diamond" }), "point of no return")));
  }
  if (model.active) {
    overlay.append(h("div", { class: "tl-now", style: `left:${pct(x(model.now))}` }, h("span", {}, "now")));
  }
  chart.append(overlay);

  if (model.steps.length === 0) {
    chart.append(h("div", { class: "tl-empty faint" }, "No step has started yet."));
  }
  return chart;
}

function barText(b, px) {
  const digits = String(b.attempt ?? "").length;
  if (px > 78 + digits * 7) return h("span", { class: "bar-text" }, `#${b.attempt} · ${fmtDur(b.end - b.start)}`);
  if (px > 24 + digits * 7) return h("span", { class: "bar-text" }, `#${b.attempt}`);
  return null;
}

function compCaption(s) {
  const c = s.state || {};
  if (s.comp.bars.length) {
    const n = s.comp.bars.length;
    return `↩ compensation · ${n} attempt${n === 1 ? "" : "s"}`;
  }
  if (s.kind === "pivot" || s.kind === "retriable") return "never compensated";
  if (c.idempotency_keys && c.idempotency_keys.compensation === null) return "nothing to undo";
  if (!s.fwd.bars.length && !s.fwd.marks.length) return "not started";
  if (c.status === "SUCCEEDED" || c.maybe_applied) return "↩ compensation · not needed";
  return "↩ compensation";
}

function idemKey(run, s, family) {
  const phase = family === "action" ? "action" : "compensation";
  const keys = s.state?.idempotency_keys;
  if (keys && typeof keys[phase] === "string") return keys[phase];
  return `${run.id}:${s.name}:${phase}`;
}

function tipHead(s, subtitle) {
  return h("div", { class: "tip-head" }, h("span", { class: "tip-title" }, s.name), kindBadge(s.kind),
    h("span", { class: "tip-sub" }, subtitle));
}

function kv(rows) {
  return h("dl", { class: "kv" }, rows.filter(Boolean).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function tipBar(run, s, family, b, lane) {
  const t0 = tipT0(run);
  const next = lane.waits.find((w) => Math.abs(w.start - b.end) < 1e-6);
  const outcome = h("span", { class: `outcome o-${b.outcome}` }, OUTCOME[b.outcome]);
  return [
    tipHead(s, `${family === "action" ? "Action" : "Compensation"} · attempt ${b.attempt ?? "?"}`),
    kv([
      ["Outcome", outcome],
      ["Started", `${fmtClock(b.start, true)} (${fmtOffset(b.start - t0)})`],
      ["Duration", b.outcome === "running" ? `${fmtDur(b.end - b.start)} so far` : fmtDur(b.end - b.start)],
      b.error ? ["Error", h("span", { class: "tip-error" }, b.error)] : null,
      b.outcome === "failed" ? ["Retryable", b.retryable === false ? "no (non-retryable)" : "yes"] : null,
      b.maybeApplied ? ["Effect", "possibly applied"] : null,
      next ? ["Then", `retry after ${fmtDur(next.due - next.start)}`] : null,
      ["Idempotency key", h("code", { class: "key" }, idemKey(run, s, family))],
    ]),
  ];
}

function tipWait(run, s, family, w) {
  return [
    tipHead(s, `${family === "action" ? "Action" : "Compensation"} · waiting to retry`),
    kv([
      ["Next attempt", `#${w.attempt}`],
      ["Backoff", fmtDur(w.due - w.start)],
      ["Due", `${fmtClock(w.due, true)}${w.how === "pending" ? ` (${rel(w.due)})` : ""}`],
      w.how === "gave_up" || w.how === "cancelled" ? ["Ended", w.how === "cancelled" ? "cancelled: the run compensates" : "gave up"] : null,
    ]),
  ];
}

function tipLaneMark(run, s, family, m) {
  const what = m.type === "gave_up" ? "gave up" : m.type === "cancelled" ? "cancelled" : m.type;
  return [
    tipHead(s, `${family === "action" ? "Action" : "Compensation"} · ${what}`),
    kv([
      ["At", `${fmtClock(m.at, true)} (${fmtOffset(m.at - tipT0(run))})`],
      m.attempt != null ? ["Attempts", String(m.attempt)] : null,
      m.error ? ["Error", h("span", { class: "tip-error" }, m.error)] : null,
      m.maybeApplied ? ["Effect", "possibly applied"] : null,
    ]),
  ];
}

function tipRunMarks(run, model, items) {
  return [
    h("div", { class: "tip-head" }, h("span", { class: "tip-title" }, "run"), h("span", { class: "tip-sub" }, fmtClock(items[0].at, true))),
    h("ul", { class: "tip-events" }, items.map((m) => h("li", {}, h("code", {}, m.kind), eventDetails(m)))),
  ];
}

const tipT0 = (run) => Math.min(run.created_at ?? Infinity, run.history?.[0]?.at ?? Infinity);

function eventDetails(e) {
  const d = e.data || {};
  const out = [];
  if (d.status) out.push(pill(d.status, "small"));
  if (d.actor) out.push(h("span", { class: "ev-actor" }, `by ${d.actor}`));
  if (d.reason) out.push(h("span", { class: "ev-reason" }, `“${d.reason}”`));
  if (d.error) out.push(h("span", { class: "ev-error" }, d.error));
  if (d.delay != null) out.push(h("span", { class: "muted" }, `in ${fmtDur(d.delay)}`));
  if (d.retryable === false) out.push(h("span", { class: "tag" }, "not retryable"));
  if (d.maybe_applied) out.push(h("span", { class: "tag warn" }, "possibly applied"));
  if (d.saga) out.push(h("span", { class: "muted" }, `${d.saga} v${d.version ?? "?"}`));
  if (d.event) out.push(h("span", { class: "muted" }, d.event));
  if (d.action) out.push(h("span", { class: "muted" }, d.action));
  const known = new Set(["status", "actor", "reason", "error", "delay", "retryable", "maybe_applied", "saga", "version", "event", "action"]);
  for (const [k, v] of Object.entries(d)) {
    if (!known.has(k)) out.push(h("span", { class: "muted" }, `${k}: ${typeof v === "string" ? v : JSON.stringify(v)}`));
  }
  return out.length ? h("span", { class: "ev-details" }, out) : null;
}

function eventFamily(kind) {
  if (kind.endsWith(".succeeded")) return kind.startsWith("compensation") ? "comp-ok" : "ok";
  if (kind.endsWith(".failed") || kind.endsWith(".gave_up")) return "bad";
  if (kind.endsWith(".retry_scheduled")) return "wait";
  if (kind.endsWith(".interrupted") || kind.endsWith(".cancelled") || kind === "event.ignored") return "warn";
  if (kind.startsWith("operator.")) return "op";
  if (kind.startsWith("compensation") || kind === "run.compensating") return "comp";
  if (kind.startsWith("run.")) return "run";
  return "neutral";
}

function eventsTable(run) {
  const hist = run.history || [];
  const t0 = tipT0(run);
  if (!hist.length) return h("p", { class: "faint small pad" }, "No events recorded yet.");
  return h("table", { class: "events" },
    h("colgroup", {}, h("col", { class: "w-time" }), h("col", { class: "w-off" }), h("col", { class: "w-kind" }),
      h("col", { class: "w-step" }), h("col", { class: "w-att" }), h("col")),
    h("thead", {}, h("tr", {}, h("th", {}, "Time"), h("th", { class: "num" }, "Offset"), h("th", {}, "Event"),
      h("th", {}, "Step"), h("th", { class: "num" }, "Try"), h("th", {}, "Details"))),
    h("tbody", {}, hist.map((e) => h("tr", { class: `ev f-${eventFamily(e.kind)}`, "data-kind": e.kind },
      h("td", { class: "mono nowrap", title: fmtDate(e.at) }, fmtClock(e.at, true)),
      h("td", { class: "num muted nowrap" }, fmtOffset(e.at - t0)),
      h("td", { class: "nowrap" }, h("span", { class: "ev-dot" }), h("code", { class: "ev-kind" }, e.kind)),
      h("td", { class: "mono small nowrap", title: e.step || null }, e.step || ""),
      h("td", { class: "num" }, e.attempt ?? ""),
      h("td", { class: "ev-detail-cell" }, eventDetails(e))))));
}

// ------------------------------------------------------------------------------------- tooltip

const tooltip = (() => {
  const el = document.getElementById("tooltip");
  let anchor = null;
  let pinned = false;
  const place = () => {
    if (!anchor || !anchor.isConnected) return hide();
    const r = anchor.getBoundingClientRect();
    el.hidden = false;
    const tw = el.offsetWidth;
    const th = el.offsetHeight;
    let left = Math.min(Math.max(8, r.left + r.width / 2 - tw / 2), window.innerWidth - tw - 8);
    let top = r.top - th - 10;
    if (top < 8) top = r.bottom + 10;
    el.style.left = `${left}px`;
    el.style.top = `${top}px`;
  };
  const show = (target, pin = false) => {
    if (pinned && !pin && target !== anchor) return;
    anchor?.classList.remove("selected");
    anchor = target;
    pinned = pin;
    const head = pin ? h("button", { class: "tip-close", type: "button", "aria-label": "Close", onclick: () => hide() }, icon("close")) : null;
    el.replaceChildren(...[head, target.tip()].flat(Infinity).filter(Boolean));
    el.classList.toggle("pinned", pin);
    if (pin) target.classList.add("selected");
    place();
  };
  function hide() {
    anchor?.classList.remove("selected");
    anchor = null;
    pinned = false;
    el.hidden = true;
  }
  document.addEventListener("mouseover", (e) => {
    const target = e.target.closest?.(".bar,.wait,.rmark,.lmark");
    if (target?.tip) show(target);
    else if (!pinned && anchor) hide();
  });
  document.addEventListener("focusin", (e) => { if (e.target.tip && !pinned) show(e.target); });
  document.addEventListener("click", (e) => {
    const target = e.target.closest?.(".bar,.wait,.rmark,.lmark");
    if (target?.tip) { e.preventDefault(); if (pinned && anchor === target) hide(); else show(target, true); return; }
    if (pinned && !el.contains(e.target)) hide();
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") hide(); });
  window.addEventListener("scroll", () => { if (anchor) place(); }, { passive: true });
  window.addEventListener("resize", () => { if (anchor) place(); });
  return { hide, get pinnedKey() { return pinned ? anchor : null; } };
})();

// -------------------------------------------------------------------------------------- run view

function runView(id) {
  let alive = true;
  let run = null;
  let timer = null;
  let pollFastUntil = 0;
  let pending = null; // {action, label}: a request we made, until a worker carries it out
  let lastTimelineKey = "";
  let lastInput = null;
  let lastResults = null;
  let armed = null;

  const head = h("div", { class: "card run-head" });
  const banners = h("div", { class: "banners" });
  const tlWrap = h("div", { class: "tl-wrap" });
  const legend = h("div", { class: "legend" },
    h("span", {}, h("i", { class: "lg lg-ok" }), "action succeeded"),
    h("span", {}, h("i", { class: "lg lg-failed" }), "failed"),
    h("span", {}, h("i", { class: "lg lg-comp" }), "compensated"),
    h("span", {}, h("i", { class: "lg lg-interrupted" }), "interrupted"),
    h("span", {}, h("i", { class: "lg lg-running" }), "in flight"),
    h("span", {}, h("i", { class: "lg lg-wait" }), "retry backoff"),
    h("span", {}, h("i", { class: "lg lg-pivot" }), "point of no return"));
  const timelineCard = h("section", { class: "card timeline-card" },
    h("div", { class: "card-head" }, h("h2", {}, "Timeline"), legend),
    tlWrap,
    h("p", { class: "faint small hint" }, "Hover or click a bar for its attempt, duration, error and idempotency key. Compensations run in reverse, from the last step back to the first."));
  const eventsBody = h("div", { class: "events-wrap" });
  const eventsCount = h("span", { class: "muted small" });
  const eventsCard = h("section", { class: "card events-card" },
    h("div", { class: "card-head" }, h("h2", {}, "Events"), eventsCount), eventsBody);

  // Operator actions.
  const reason = h("textarea", { id: "reason", name: "reason", rows: 3, required: true,
    placeholder: "Why? It is recorded in the run's history with your name.", "aria-describedby": "action-msg" });
  const msg = h("div", { id: "action-msg", class: "action-msg", role: "status", "aria-live": "polite" });
  const buttons = {};
  for (const [name, a] of Object.entries(ACTIONS)) {
    buttons[name] = h("button", { class: `btn action${a.primary ? " primary" : ""}${a.danger ? " danger" : ""}`, type: "button",
      "data-action": name, onclick: () => act(name) }, a.label);
  }
  const actionHelp = h("ul", { class: "action-help" });
  const roleNote = h("p", { class: "role-note", hidden: true });
  reason.addEventListener("input", () => { reason.classList.remove("invalid"); disarm(); });
  const actionForm = h("div", { class: "action-form" },
    h("label", { for: "reason", class: "field-label" }, "Reason ", h("span", { class: "req" }, "required")),
    reason,
    h("div", { class: "action-buttons" }, Object.values(buttons)));
  const actionsCard = h("section", { class: "card actions-card", "aria-labelledby": "actions-title" },
    h("h2", { id: "actions-title" }, "Operator actions"),
    roleNote, actionForm, msg, actionHelp);

  const inputSlot = h("div");
  const resultsSlot = h("div");
  const detailsCard = h("section", { class: "card details-card" });

  const root = h("section", { class: "page run-page" },
    h("a", { class: "back", href: "#/runs" }, icon("back"), "All runs"),
    head, banners,
    h("div", { class: "run-grid" },
      h("div", { class: "run-main" }, timelineCard, eventsCard),
      h("aside", { class: "run-side" }, actionsCard, detailsCard, inputSlot, resultsSlot)));
  $app.replaceChildren(h("div", { class: "loading" }, "Loading run…"));

  let width = 0;
  const resize = new ResizeObserver(() => {
    const w = tlWrap.clientWidth;
    if (run && Math.abs(w - width) > 4) { width = w; renderTimeline(true); }
  });

  function setMsg(kind, ...content) {
    msg.className = `action-msg ${kind}`;
    msg.replaceChildren(...content);
  }

  function disarm() {
    if (!armed) return;
    buttons[armed].textContent = ACTIONS[armed].label;
    buttons[armed].classList.remove("armed");
    armed = null;
  }

  function allowed(name) {
    if (!run || run.request) return false;
    // The server says which actions the run's state allows; older servers leave it to us.
    if (Array.isArray(run.allowed_actions)) return run.allowed_actions.includes(name);
    return ACTIONS[name].statuses.includes(run.status);
  }

  function renderActions() {
    const operator = canOperate();
    roleNote.hidden = operator;
    roleNote.textContent = operator ? "" : `Your role (${me?.role || "none"}) can look but not act: operator actions need an operator token.`;
    for (const [name, b] of Object.entries(buttons)) {
      const ok = allowed(name);
      b.disabled = !ok || !operator || busy;
      b.title = run.request ? `A ${run.request.action} request is waiting for a worker`
        : ok ? ACTIONS[name].help : `Not possible while the run is ${run.status}`;
    }
    reason.disabled = !operator;
    const offered = Object.entries(ACTIONS).filter(([n]) => allowed(n));
    actionHelp.replaceChildren(...offered.map(([, a]) => h("li", {}, h("strong", {}, a.label), ": ", a.help)));
    const nothing = !offered.length && !run.request && !pending;
    actionForm.hidden = nothing && !reason.value;
    if (nothing) {
      actionHelp.replaceChildren(h("li", { class: "faint" }, `No action applies to a ${run.status.toLowerCase()} run.`));
    }
  }

  let busy = false;
  async function act(name) {
    if (!run || busy) return;
    const text = reason.value.trim();
    if (!text) {
      reason.classList.add("invalid");
      reason.focus();
      setMsg("error", "Write a reason first: it is recorded in the run's history.");
      return;
    }
    const a = ACTIONS[name];
    if (a.confirm && armed !== name) {
      disarm();
      armed = name;
      buttons[name].textContent = `Confirm ${a.label.toLowerCase()}?`;
      buttons[name].classList.add("armed");
      setMsg("info", `${a.help} Click again to confirm.`);
      return;
    }
    disarm();
    busy = true;
    renderActions();
    setMsg("info", h("span", { class: "spinner" }), `Requesting ${a.label.toLowerCase()}…`);
    try {
      const res = await api(`api/runs/${encodeURIComponent(run.id)}/${name}`, { method: "POST", body: { reason: text } });
      if (!alive) return;
      reason.value = "";
      pending = { action: name, label: a.label };
      pollFastUntil = Date.now() + 60_000;
      busy = false;
      setMsg("info", h("span", { class: "spinner" }), `${a.label} requested. Waiting for a worker to carry it out…`);
      if (res && typeof res === "object" && res.id === run.id) {
        run = { ...run, ...res, history: res.history || run.history, steps: res.steps || run.steps };
        render();
      }
      load();
    } catch (e) {
      if (!alive) return;
      const prefix = e.status === 409 ? "Refused: " : e.status === 422 ? "Invalid request: " : e.status === 403 ? "Not allowed: " : "";
      setMsg("error", prefix + e.message);
      busy = false;
      if (e.status === 409) load();
    } finally {
      busy = false;
      if (run) renderActions();
    }
  }

  function renderHead() {
    const finished = !ACTIVE.has(run.status);
    const duration = (finished ? run.updated_at : Date.now() / 1000) - run.created_at;
    head.replaceChildren(
      h("div", { class: "run-title" },
        h("h1", {}, h("span", { class: "saga-name" }, run.saga), h("span", { class: "ver" }, `v${run.version}`)),
        pill(run.status, "large")),
      h("div", { class: "run-id" }, h("code", { class: "mono", id: "run-id" }, run.id), copyButton(run.id, "Copy id")),
      h("dl", { class: "meta" },
        h("div", {}, h("dt", {}, "Started"), h("dd", {}, fmtDate(run.created_at), " ", h("span", { class: "muted" }, "(", relEl(run.created_at), ")"))),
        h("div", {}, h("dt", {}, finished ? "Duration" : "Running for"), h("dd", {}, fmtDur(duration))),
        h("div", {}, h("dt", {}, "Last change"), h("dd", {}, relEl(run.updated_at))),
        startKey(run) ? h("div", {}, h("dt", {}, "Start key"), h("dd", { class: "mono small" }, startKey(run))) : null));
  }

  function renderBanners() {
    const items = [];
    if (run.request) {
      const r = run.request;
      items.push(h("div", { class: "banner request" }, h("span", { class: "spinner" }),
        h("div", {}, h("strong", {}, `${title(r.action || "action")} requested`),
          r.actor ? ` by ${r.actor}` : "", r.at ? [" ", relEl(r.at)] : "",
          r.reason ? [" — ", h("q", {}, r.reason)] : "",
          h("div", { class: "muted small" }, "Waiting for a worker that registers this saga to carry it out."))));
    }
    if (run.error) {
      const label = run.status === "FAILED" ? "Needs an operator" : run.status === "COMPENSATED" ? "Compensated because"
        : run.status === "COMPENSATING" ? "Compensating because" : "Note";
      items.push(h("div", { class: `banner err s-${run.status}` }, h("strong", {}, label), h("p", {}, run.error)));
    }
    banners.replaceChildren(...items);
  }

  function renderDetails() {
    const rows = [
      ["Status", pill(run.status)],
      ["Worker", run.owner ? h("span", { class: "mono small" }, run.owner) : h("span", { class: "faint" }, "none")],
      run.lease_expires ? ["Lease until", [fmtClock(run.lease_expires), " ", h("span", { class: "muted" }, "(", relEl(run.lease_expires), ")")]] : null,
      run.wake_at ? ["Next timer", [fmtClock(run.wake_at), " ", h("span", { class: "muted" }, "(", relEl(run.wake_at), ")")]] : null,
      ["Steps", stepsSummary(run)],
    ];
    detailsCard.replaceChildren(h("h2", {}, "Details"), kv(rows));
  }

  function renderTimeline(force = false) {
    const key = JSON.stringify([run.history?.length, run.status, run.request, width]);
    if (!force && key === lastTimelineKey && !ACTIVE.has(run.status)) return;
    lastTimelineKey = key;
    const pinned = tooltip.pinnedKey;
    const pinnedSel = pinned ? selectorFor(pinned) : null;
    const labelW = parseFloat(getComputedStyle(tlWrap).getPropertyValue("--label-w")) || 236;
    tlWrap.replaceChildren(timelineView(run, { width: (width || tlWrap.clientWidth || 800) - 36 - labelW - 26 }));
    if (pinned) {
      const again = pinnedSel && tlWrap.querySelector(pinnedSel);
      if (again) again.click(); else tooltip.hide();
    }
    eventsCount.textContent = `${run.history?.length || 0} transitions, oldest first`;
    eventsBody.replaceChildren(eventsTable(run));
  }

  function render() {
    if (!root.isConnected) $app.replaceChildren(root);
    document.title = `${run.saga} ${shortId(run.id)} · ${title(run.status)} · sagaway`;
    root.dataset.status = run.status;
    settlePending();
    renderHead();
    renderBanners();
    renderDetails();
    renderActions();
    if (!width) width = tlWrap.clientWidth;
    renderTimeline();
    const inJson = JSON.stringify(run.input);
    if (inJson !== lastInput) { lastInput = inJson; inputSlot.replaceChildren(jsonCard("Input", run.input, "No input.")); }
    const resJson = JSON.stringify(run.results);
    if (resJson !== lastResults) { lastResults = resJson; resultsSlot.replaceChildren(jsonCard("Results", run.results, "No step has returned a result.")); }
  }

  function settlePending() {
    if (pending && !run.request) {
      // A worker took the request up; follow the run until it settles (or a minute passes).
      if (ACTIVE.has(run.status) && Date.now() < pollFastUntil) {
        if (!pending.taken) pollFastUntil = Date.now() + 60_000;
        pending.taken = true;
        setMsg("info", h("span", { class: "spinner" }),
          h("span", {}, `${pending.label} taken up by a worker: the run is `, pill(run.status, "small"), "…"));
      } else {
        setMsg("ok", icon("check"), h("span", {}, `${pending.label} carried out: the run is now `, pill(run.status, "small")));
        pending = null;
        pollFastUntil = 0;
      }
    }
  }

  async function load() {
    clearTimeout(timer);
    try {
      const data = await api(`api/runs/${encodeURIComponent(id)}`);
      if (!alive) return;
      run = data;
      render();
    } catch (e) {
      if (!alive || e.status === 401) return;
      if (!run) {
        $app.replaceChildren(h("div", { class: "page" }, h("a", { class: "back", href: "#/runs" }, icon("back"), "All runs"),
          h("div", { class: "card notice error" }, h("h2", {}, e.status === 404 ? "Run not found" : "Cannot load this run"),
            h("p", {}, e.message))));
        if (e.status === 404) return;
      } else {
        banners.prepend(h("div", { class: "banner err" }, h("strong", {}, "Refresh failed"), h("p", {}, e.message)));
      }
    }
    schedule();
  }

  function schedule() {
    clearTimeout(timer);
    if (!alive) return;
    const fast = Date.now() < pollFastUntil;
    if (pending && !fast && run?.request) {
      setMsg("info", `${pending.label} is still waiting for a worker. Is a worker with this saga's definition running?`);
    }
    const active = run && (ACTIVE.has(run.status) || run.request);
    const ms = fast ? 600 : active ? 2500 : null;
    if (ms) timer = setTimeout(load, ms);
  }

  load().then(() => { if (alive) resize.observe(tlWrap); });

  return {
    route: "run",
    destroy() { alive = false; clearTimeout(timer); resize.disconnect(); },
  };
}

function selectorFor(el) {
  const lanes = el.closest(".tl-lanes");
  if (!lanes) return null;
  const laneCls = el.closest(".lane")?.classList.contains("comp") ? "comp" : "fwd";
  const cls = [...el.classList].filter((c) => c !== "selected").map((c) => `.${CSS.escape(c)}`).join("");
  const attempt = el.dataset.attempt ? `[data-attempt="${CSS.escape(el.dataset.attempt)}"]` : "";
  return `.tl-lanes[data-step="${CSS.escape(lanes.dataset.step)}"] .lane.${laneCls} ${cls}${attempt}`;
}

const startKey = (run) => run.start_key ?? run.idempotency_key ?? null;

function stepsSummary(run) {
  const steps = stepList(run);
  if (!steps.length) return h("span", { class: "faint" }, "none started");
  return h("ul", { class: "step-list" }, steps.map((s) => h("li", {},
    h("span", { class: "mono small step-li-name", title: s.name }, s.name), kindBadge(s.kind),
    h("span", { class: `step-status st-${s.status || "PENDING"}` },
      s.status ? s.status.toLowerCase().replace("_", " ") : "not started"))));
}

boot();
