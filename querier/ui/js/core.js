// Shared by every page: DOM building, the API client (query key from the project
// picker), the hash router's links and page parameters, formatting, the small
// pieces several pages draw (badges, totals, marks), walking a trace's span tree,
// reading chat messages out of span inputs and outputs, and a concurrency limiter.
//
// The UI is plain ES modules with no build step and no dependency: see docs/ui.md.

/** Builds an element: h('a', {href: '#/x', class: 'c', onclick: f}, 'text', child…). */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** Builds an SVG element, like `h`. */
export function svg(tag, attrs, ...children) {
  return build(document.createElementNS('http://www.w3.org/2000/svg', tag), attrs, children);
}

function build(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'style' && typeof v === 'object') Object.assign(el.style, v);
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replaces the children of `el`. */
export function mount(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// --- Projects and keys -------------------------------------------------------

const KEYS = 'loupe.projects';
const CURRENT = 'loupe.current';

/** Saved projects: [{project, environment, key}] (keys stay in this browser). */
export function savedProjects() {
  try {
    return JSON.parse(localStorage.getItem(KEYS) || '[]');
  } catch {
    return [];
  }
}

export function saveProject(entry) {
  const list = savedProjects().filter((p) => p.project !== entry.project);
  list.push(entry);
  list.sort((a, b) => a.project.localeCompare(b.project));
  localStorage.setItem(KEYS, JSON.stringify(list));
  localStorage.setItem(CURRENT, entry.project);
}

export function forgetProject(project) {
  localStorage.setItem(KEYS, JSON.stringify(savedProjects().filter((p) => p.project !== project)));
  if (localStorage.getItem(CURRENT) === project) localStorage.removeItem(CURRENT);
}

export function selectProject(project) {
  localStorage.setItem(CURRENT, project);
}

/** The project the UI reads: the one picked, else the first saved, else none. */
export function currentProject() {
  const list = savedProjects();
  const want = localStorage.getItem(CURRENT);
  return list.find((p) => p.project === want) || list[0] || null;
}

// --- API ---------------------------------------------------------------------

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** A 401 or 403: a page rethrows it, and the shell asks for a key. */
export function isAuthError(e) {
  return Boolean(e) && (e.status === 401 || e.status === 403);
}

/** Query string of `params`, without empty values. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v === null || v === undefined || v === '') continue;
    q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

function authHeaders(key) {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** GET /api/…: the JSON answer, or an ApiError with the server's message. */
export async function api(path, params, opts = {}) {
  const key = opts.key !== undefined ? opts.key : currentProject()?.key;
  const res = await fetch(path + query(params), {
    headers: authHeaders(key),
    signal: opts.signal,
  });
  return answer(res);
}

/** POST JSON to /api/…. */
export async function post(path, body) {
  const res = await fetch(path, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...authHeaders(currentProject()?.key) },
    body: JSON.stringify(body),
  });
  return answer(res);
}

/** GET one trace: {trace_id, roots: [span tree], scores, totals…}. */
export function fetchTrace(id) {
  return api(`/api/v1/traces/${encodeURIComponent(id)}`);
}

async function answer(res) {
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    // not JSON: keep the text for the message
  }
  if (!res.ok) {
    throw new ApiError(res.status, (json && json.error) || text || res.statusText);
  }
  return json;
}

// --- Routing -----------------------------------------------------------------

/** `#/path?k=v` for a page and its parameters (empty values left out). */
export function link(path, params) {
  return `#/${path}${query(params)}`;
}

export function navigate(path, params) {
  location.hash = link(path, params);
}

/** Navigates to `path` with the page's `current` parameters updated by `changes`
 * (a change to '' or null removes the parameter). */
export function go(path, current, changes) {
  const next = { ...current, ...changes };
  for (const k of Object.keys(next)) if (next[k] === '' || next[k] === null) delete next[k];
  navigate(path, next);
}

/** The link to a trace, with a span selected (and other parameters kept). */
export function traceLink(id, span, params) {
  return link(`trace/${encodeURIComponent(id)}`, { ...params, span });
}

/** The link to a session's page. */
export function sessionLink(id, params) {
  return link(`session/${encodeURIComponent(id)}`, params);
}

/**
 * A page's parameters: the URL's over `defaults` (which hold the default `since`).
 * A start in the URL (a range from a link, as the dashboard makes) beats the
 * default `since`.
 */
export function rangeParams(params, defaults) {
  const p = { ...defaults, ...params };
  if (p.start) delete p.since;
  return p;
}

/** The API's time range of page parameters: start/end when given, else since/end. */
export function apiRange(p) {
  return p.start ? { start: p.start, end: p.end } : { since: p.since, end: p.end };
}

/** The current route: {path: ['trace', '<id>'], params: {…}}. */
export function currentRoute() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [p, q] = raw.split('?', 2);
  const params = Object.fromEntries(new URLSearchParams(q || ''));
  const decode = (seg) => {
    try {
      return decodeURIComponent(seg);
    } catch {
      return seg; // a malformed escape: keep it as typed
    }
  };
  return { path: (p || '').split('/').filter(Boolean).map(decode), params };
}

// --- Formatting --------------------------------------------------------------

/** 7 → "07", for dates and times. */
export const pad2 = (n) => String(n).padStart(2, '0');

export function fmtMs(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return '–';
  if (ms < 1) return `${(ms * 1000).toFixed(0)} µs`;
  if (ms < 1000) return `${ms < 10 ? ms.toFixed(1) : ms.toFixed(0)} ms`;
  if (ms < 9995) return `${(ms / 1000).toFixed(2)} s`;
  if (ms < 59950) return `${(ms / 1000).toFixed(1)} s`;
  // Whole seconds first, so 119.6 s reads "2 min 0 s", not "1 min 60 s".
  const s = Math.round(ms / 1000);
  return `${Math.floor(s / 60)} min ${s % 60} s`;
}

export function fmtCost(usd) {
  if (usd === null || usd === undefined) return '–';
  if (usd === 0) return '$0';
  if (usd < 0.0001) return `$${usd.toExponential(1)}`;
  if (usd < 1) return `$${usd.toFixed(4)}`;
  return `$${usd.toFixed(2)}`;
}

export function fmtInt(n) {
  if (n === null || n === undefined) return '–';
  return Number(n).toLocaleString('en-US');
}

export function fmtPct(x) {
  if (x === null || x === undefined) return '–';
  return `${(x * 100).toFixed(x < 0.1 ? 1 : 0)} %`;
}

/** Local date and time of Unix nanoseconds (or an RFC 3339 string). */
export function fmtTime(t) {
  const d = typeof t === 'number' ? new Date(t / 1e6) : new Date(t);
  if (Number.isNaN(d.getTime())) return '–';
  const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())}`;
  return `${date} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
}

/** "3 min ago" for Unix nanoseconds. */
export function fmtAgo(ns) {
  const s = (Date.now() - ns / 1e6) / 1000;
  if (s < 60) return `${Math.max(0, Math.round(s))} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

/** 1234 → "1.2k", 2500000 → "2.5M": for axis labels. */
export function fmtShort(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return '–';
  const a = Math.abs(n);
  const trim = (x) => String(Number(x.toFixed(x < 10 ? 1 : 0)));
  if (a >= 1e9) return `${trim(n / 1e9)}G`;
  if (a >= 1e6) return `${trim(n / 1e6)}M`;
  if (a >= 1e3) return `${trim(n / 1e3)}k`;
  return String(Number(n.toFixed(a < 1 ? 3 : a < 10 ? 1 : 0)));
}

/** A duration in ms for an axis: "250 ms", "12 s", "4.5 min", "2 h". */
export function fmtDurShort(ms) {
  if (ms === 0) return '0';
  const n = (x) => String(Number(x.toFixed(x < 10 ? 1 : 0)));
  if (ms < 1000) return `${n(ms)} ms`;
  if (ms < 60e3) return `${n(ms / 1e3)} s`;
  if (ms < 3600e3) return `${n(ms / 60e3)} min`;
  return `${n(ms / 3600e3)} h`;
}

/** A signed number with its unit: "+1.2 s", "-$0.0012", "+340". */
export function fmtSigned(n, format) {
  if (n === null || n === undefined || Number.isNaN(n)) return '';
  if (n === 0) return '±0';
  return `${n > 0 ? '+' : '−'}${format(Math.abs(n))}`;
}

/** A relative change: 0.153 → "+15 %". */
export function fmtRelative(r) {
  if (r === null || r === undefined || !Number.isFinite(r)) return '';
  const pct = r * 100;
  const digits = Math.abs(pct) < 10 ? 1 : 0;
  return `${pct > 0 ? '+' : pct < 0 ? '−' : '±'}${Math.abs(pct).toFixed(digits)} %`;
}

/** Seconds of a duration like the API's: "90s", "15m", "24h", "7d", "2w". */
export function durationSeconds(text) {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$/.exec(String(text || ''));
  if (!m) return null;
  const unit = { ms: 0.001, s: 1, m: 60, h: 3600, d: 86400, w: 604800 }[m[2]];
  return Number(m[1]) * unit;
}

// --- Small shared pieces -----------------------------------------------------

/** The environment badge: dev, staging, prod (or none). */
export function envBadge(env) {
  const e = env || 'unknown';
  return h('span', { class: `env env-${e}`, title: `environment: ${e}` }, e);
}

/** A span kind's badge (LLM, TOOL, RETRIEVER, …). */
export function kindBadge(kind) {
  const k = (kind || 'UNKNOWN').toUpperCase();
  return h('span', { class: `kind kind-${k.toLowerCase()}` }, k);
}

export function errorBox(err) {
  const msg = err instanceof Error ? err.message : String(err);
  return h('div', { class: 'error-box', role: 'alert' }, msg);
}

export function loading(what = 'Loading…') {
  return h('div', { class: 'loading' }, what);
}

/** The red mark of a failed trace or span; `title` null for no tooltip. */
export function errorMark(text = '✕ error', title = 'a span failed') {
  return h('span', { class: 'err-mark', title }, text);
}

/**
 * A row of totals tiles, each a big value over its label:
 * tiles: [[value, label, {title?, href?, mark?}?], …] (href: the value is a link;
 * mark: a class for the value); attrs: {id?, class?} of the row.
 */
export function totals(tiles, { id, class: cls } = {}) {
  return h('div', { class: cls ? `totals ${cls}` : 'totals', id: id || null },
    tiles.map(([value, label, { title, href, mark } = {}]) => {
      const b = h('b', { class: mark || null }, value);
      return h('div', { class: 't', title: title || null }, href ? h('a', { href }, b) : b, h('span', {}, label));
    }));
}

/** The time-range presets of every page. */
export const RANGES = ['15m', '1h', '3h', '6h', '24h', '3d', '7d', '30d'];

/** A row of range buttons; `onpick(range)`. */
export function rangePicker(current, onpick) {
  return h(
    'div',
    { class: 'ranges', role: 'group', 'aria-label': 'time range' },
    RANGES.map((r) =>
      h('button', { type: 'button', class: r === current ? 'on' : '', onclick: () => onpick(r) }, r),
    ),
  );
}

// --- JSON --------------------------------------------------------------------

/** Parses JSON text, or returns null. */
export function tryJson(text) {
  if (typeof text !== 'string') return null;
  const t = text.trim();
  if (!(t.startsWith('{') || t.startsWith('['))) return null;
  try {
    return JSON.parse(t);
  } catch {
    return null;
  }
}

// --- Span trees --------------------------------------------------------------

/**
 * Calls `visit(span, depth)` on every span of a trace, depth-first, parents before
 * children, without recursion (deep trees are fine). Stops at the first span for
 * which `visit` returns true, and returns it (else null).
 */
export function walkSpans(roots, visit) {
  const stack = [...(roots || [])].reverse().map((s) => [s, 0]);
  while (stack.length) {
    const [s, d] = stack.pop();
    if (visit(s, d) === true) return s;
    const kids = s.children || [];
    for (let i = kids.length - 1; i >= 0; i--) stack.push([kids[i], d + 1]);
  }
  return null;
}

// --- Chat messages in span inputs and outputs ------------------------------------
// OpenAI-like messages: [{role, content (text or parts), tool_calls, tool_call_id, …}].

/** The messages of an input or output (JSON text, or a value), or null when it is
 * not a non-empty list of messages, each an object with a string role. */
export function parseMessages(value) {
  const parsed = typeof value === 'string' ? tryJson(value) : value;
  const ok = Array.isArray(parsed) && parsed.length > 0
    && parsed.every((m) => m && typeof m === 'object' && !Array.isArray(m) && typeof m.role === 'string');
  return ok ? parsed : null;
}

/**
 * The readable text of a span's input or output, for a short preview: plain text as
 * is (a JSON string literal unquoted); chat messages (an array, `{messages}`,
 * `{choices}`) as the last message of `role` (else the last message); framework
 * wrappers (`{"args": [...]}`, `{"input": …}`) unwrapped; other JSON pretty-printed.
 * Null when there is nothing.
 */
export function messageText(raw, role) {
  if (raw === null || raw === undefined || raw === '') return null;
  const s = String(raw);
  const j = tryJson(s);
  if (j === null) {
    if (/^\s*"/.test(s)) {
      try {
        const v = JSON.parse(s); // a JSON string literal
        if (typeof v === 'string') return v;
      } catch {
        // not JSON after all
      }
    }
    return s;
  }
  return textFromJson(j, role) ?? JSON.stringify(j, null, 2);
}

/** Keys whose string value is the text of a wrapper object, in order of preference. */
const TEXT_KEYS = ['input', 'query', 'question', 'prompt', 'text', 'content', 'output', 'answer', 'result', 'response'];

function textFromJson(j, role) {
  if (typeof j === 'string') return j;
  if (Array.isArray(j)) {
    // Lenient: the messages among other items, whatever their role's type.
    const msgs = j.filter((m) => m && typeof m === 'object' && 'role' in m);
    if (msgs.length) {
      const mine = msgs.filter((m) => m.role === role);
      return contentText((mine.length ? mine : msgs).at(-1));
    }
    if (j.length && j.every((x) => typeof x === 'string')) return j.join('\n');
    return null;
  }
  if (j && typeof j === 'object') {
    if (Array.isArray(j.messages)) return textFromJson(j.messages, role);
    if (Array.isArray(j.choices) && j.choices[0]) return contentText(j.choices[0].message || j.choices[0]);
    if (Array.isArray(j.args) && typeof j.args[0] === 'string') return j.args[0];
    for (const k of TEXT_KEYS) if (typeof j[k] === 'string') return j[k];
    for (const k of TEXT_KEYS) {
      if (j[k] && typeof j[k] === 'object') {
        const r = textFromJson(j[k], role);
        if (r) return r;
      }
    }
  }
  return null;
}

/** A chat message's text: its content (text parts joined), else its tool calls as
 * "→ name(arguments)". */
function contentText(m) {
  if (!m) return null;
  let c = m.content;
  if (Array.isArray(c)) c = c.map((part) => (typeof part === 'string' ? part : part?.text ?? '')).filter(Boolean).join('\n');
  if (typeof c === 'string' && c) return c;
  const calls = m.tool_calls || (m.function_call ? [m.function_call] : null);
  if (calls && calls.length) {
    return calls.map((tc) => `→ ${tc.name || tc.function?.name || 'tool'}(${tc.arguments ?? tc.function?.arguments ?? ''})`).join('\n');
  }
  return c && typeof c === 'object' ? JSON.stringify(c, null, 2) : null;
}

// --- Concurrency -------------------------------------------------------------

/**
 * Runs `task()` functions with at most `n` running at once: `const run = limiter(4);
 * run(() => fetch(…))` returns the task's promise.
 */
export function limiter(n) {
  let running = 0;
  const waiting = [];
  const next = () => {
    if (running >= n || !waiting.length) return;
    const { task, resolve, reject } = waiting.shift();
    running++;
    Promise.resolve()
      .then(task)
      .then(resolve, reject)
      .finally(() => {
        running--;
        next();
      });
  };
  return (task) => new Promise((resolve, reject) => {
    waiting.push({ task, resolve, reject });
    next();
  });
}
