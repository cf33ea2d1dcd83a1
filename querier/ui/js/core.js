// Shared by every page: DOM building, the API client (query key from the project
// picker), the hash router's links, and formatting.
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
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(
    d.getMinutes(),
  )}:${pad(d.getSeconds())}`;
}

/** "3 min ago" for Unix nanoseconds. */
export function fmtAgo(ns) {
  const s = (Date.now() - ns / 1e6) / 1000;
  if (s < 60) return `${Math.max(0, Math.round(s))} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
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

/** Pretty JSON if `text` is JSON, else the text. */
export function pretty(text) {
  const j = tryJson(text);
  return j === null ? String(text ?? '') : JSON.stringify(j, null, 2);
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

/** Every span of a trace, depth-first, with its depth: [{span, depth}]. */
export function flatten(roots) {
  const out = [];
  const stack = [...roots].reverse().map((s) => [s, 0]);
  while (stack.length) {
    const [s, d] = stack.pop();
    out.push({ span: s, depth: d });
    for (let i = s.children.length - 1; i >= 0; i--) stack.push([s.children[i], d + 1]);
  }
  return out;
}
