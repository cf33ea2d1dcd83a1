// The trace view: a header with the trace's totals and scores, a virtualized
// waterfall (span tree beside a timeline) on the left, and the selected span's
// details on the right (chat for LLM spans, ranked documents for retrievers, …).
//
// The waterfall only keeps the rows in view in the DOM: a 5,000-span trace opens
// and scrolls like a 5-span one. The selected span lives in the URL (`?span=`),
// written with history.replaceState so that selecting does not re-render the page.

import {
  api, errorBox, errorMark, fetchTrace, fmtCost, fmtInt, fmtMs, fmtTime, h, kindBadge, link, mount, parseMessages,
  post, sessionLink, totals, traceLink, tryJson,
} from './core.js';

/** Row height in pixels: keep in step with `--row` in style.css. */
const ROW = 26;
/** Rows rendered above and below the visible ones. */
const OVERSCAN = 10;
/** Indentation per tree level, in pixels. */
const INDENT = 14;
/** Traces up to this many spans open fully expanded; larger ones open two levels. */
const EXPAND_ALL_UNDER = 200;
/** The time axis' ticks, as fractions of the trace's duration. */
const TICKS = [0, 0.25, 0.5, 0.75, 1];
/** How long to wait for a new score to come through the write-ahead log. */
const SCORE_POLL_MS = 1000;
const SCORE_POLL_MAX_MS = 15000;

export async function render(root, route) {
  const id = route.path[1];
  if (!id) throw new Error('No trace id in the address.');
  const [trace, me] = await Promise.all([
    fetchTrace(id),
    api('/api/v1/whoami').catch(() => null),
  ]);
  const view = new TraceView(trace, route.params, me);
  mount(root, view.el);
  view.start();
}

// --- The page ------------------------------------------------------------------

/** One trace on screen: holds the tree state, the waterfall and the detail panel. */
class TraceView {
  constructor(trace, params, me) {
    this.trace = trace;
    this.params = params;
    this.me = me;

    // Every span by id, with its depth, parent and number of descendants.
    this.nodes = indexSpans(trace.roots);
    // The timeline's bounds: the trace's, widened to any span outside them (clock skew).
    this.t0 = trace.start_ns;
    this.t1 = trace.end_ns;
    for (const n of this.nodes.values()) {
      this.t0 = Math.min(this.t0, n.span.start_ns);
      this.t1 = Math.max(this.t1, n.span.end_ns);
    }
    this.durNs = Math.max(1, this.t1 - this.t0);

    // Expanded spans: everything for small traces, the first two levels otherwise.
    const all = this.nodes.size <= EXPAND_ALL_UNDER;
    this.expanded = new Set();
    for (const [sid, n] of this.nodes) {
      if (n.span.children.length && (all || n.depth < 2)) this.expanded.add(sid);
    }

    // The selection: ?span= if it names a span of this trace, else the first root.
    const wanted = params.span && this.nodes.has(params.span) ? params.span : null;
    this.selected = wanted || trace.roots[0]?.span_id || null;
    if (wanted) this.revealAncestors(wanted);

    this.rows = []; // visible rows, [{span, depth}], recomputed on expand/collapse
    this.rowIndex = new Map(); // span_id -> index in this.rows
    this.rendered = new Map(); // index -> row element in the DOM
    this.frame = 0; // pending requestAnimationFrame id

    this.scoreForm = new ScoreForm(this);
    this.el = this.build();
    this.recompute();
    this.renderDetail();
    this.focusOnLoad = Boolean(wanted);
  }

  /** Called once the page is in the document (layout sizes are known). */
  start() {
    if (this.focusOnLoad) this.scrollToRow(this.rowIndex.get(this.selected), true);
    this.paint();
    // Repaint when the scroll container changes size (window resize, layout).
    this.resizer = new ResizeObserver(() => {
      if (!this.scroller.isConnected) {
        this.resizer.disconnect();
        return;
      }
      this.schedule();
    });
    this.resizer.observe(this.scroller);
  }

  build() {
    this.header = h('div', { class: 'trace-head' });
    this.renderHeader();

    // The waterfall: tools, the time axis, then the scroll container whose
    // canvas is as tall as all visible rows and holds only the rows in view.
    this.canvas = h('div', { class: 'wf-canvas' }, h('div', { class: 'wf-grid', 'aria-hidden': 'true' }));
    this.scroller = h('div', {
      id: 'waterfall',
      class: 'wf-scroll',
      tabindex: '0',
      role: 'tree',
      'aria-label': 'spans',
      onscroll: () => this.schedule(),
      onkeydown: (e) => this.onKey(e),
      onclick: (e) => this.onClick(e),
    }, this.canvas);
    this.countNote = h('span', { class: 'muted' });
    const waterfall = h('section', { class: 'waterfall' },
      h('div', { class: 'wf-tools' },
        h('button', { type: 'button', id: 'expand-all', onclick: () => this.expandAll(true) }, 'Expand all'),
        h('button', { type: 'button', id: 'collapse-all', onclick: () => this.expandAll(false) }, 'Collapse all'),
        this.countNote,
        h('span', { class: 'muted wf-keys' }, '↑↓ select · ←→ collapse/expand')),
      h('div', { class: 'wf-head' },
        h('div', { class: 'wf-head-name' }, 'span'),
        this.axis()),
      this.scroller);

    this.detail = h('aside', { class: 'detail', id: 'span-detail', 'aria-label': 'span details' });
    return h('div', { class: 'trace-page' },
      this.header,
      h('div', { class: 'trace-layout' }, waterfall, this.detail));
  }

  // --- Header ------------------------------------------------------------------

  renderHeader() {
    const t = this.trace;
    const rootSpan = t.roots[0];
    // A trace belongs to the session any of its spans names (as the API counts it).
    const session = t.roots.find((r) => r.session_id)?.session_id
      || [...this.nodes.values()].find((n) => n.span.session_id)?.span.session_id;
    const id = t.trace_id;
    this.traceScores = h('div', { id: 'trace-scores', class: 'scores-list' });
    mount(
      this.header,
      h('h1', { class: 'trace-title' },
        t.root_name || id,
        t.error ? errorMark(' ✕ error', 'a span of this trace failed') : null),
      h('div', { class: 'trace-meta muted' },
        h('span', {}, t.root_service || rootSpan?.service_name || '–'),
        h('span', {}, fmtTime(t.start_ns)),
        h('span', {}, 'trace ', h('code', { class: 'trace-id', title: 'trace id' }, id)),
        h('a', { href: link('compare', { a: id }) }, 'compare with…'),
        h('a', { href: link('compare', { a: id, prev: 1 }), title: 'compare with a trace of the same root name from the day before' },
          'same root name, previous day'),
        session ? h('a', { href: sessionLink(session) }, `session ${session}`) : null),
      totals([
        [fmtMs(t.duration_ms), 'duration'],
        [fmtInt(t.span_count ?? this.nodes.size), 'spans'],
        [fmtInt(t.input_tokens ?? 0), 'input tokens'],
        [fmtInt(t.output_tokens ?? 0), 'output tokens'],
        [fmtInt(t.total_tokens ?? 0), 'total tokens'],
        [fmtCost(t.cost_usd ?? 0), 'cost'],
      ], { id: 'trace-totals' }),
      this.traceScores,
    );
    this.renderTraceScores();
  }

  renderTraceScores() {
    const scores = this.trace.scores || [];
    const own = scores.filter((s) => !s.span_id);
    const onSpans = scores.length - own.length;
    mount(
      this.traceScores,
      own.length ? own.map(scoreChip) : h('span', { class: 'muted' }, 'no trace scores'),
      onSpans ? h('span', { class: 'muted' }, `+ ${onSpans} span score${onSpans > 1 ? 's' : ''}`) : null,
    );
  }

  // --- Waterfall: the time axis --------------------------------------------------

  axis() {
    const dur = this.durNs / 1e6;
    return h('div', { class: 'wf-axis' },
      TICKS.map((f) => {
        const tick = h('span', { class: `wf-tick${f === 0 ? ' first' : ''}${f === 1 ? ' last' : ''}` }, f === 0 ? '0' : fmtMs(dur * f));
        tick.style.left = `${f * 100}%`;
        return tick;
      }));
  }

  // --- Waterfall: the tree state -----------------------------------------------

  /** Recomputes the visible rows after expanding or collapsing, and repaints them all. */
  recompute() {
    this.rows = visibleRows(this.trace.roots, this.expanded);
    this.rowIndex = new Map(this.rows.map((r, i) => [r.span.span_id, i]));
    this.canvas.style.height = `${this.rows.length * ROW}px`;
    this.countNote.textContent = this.rows.length === this.nodes.size
      ? `${fmtInt(this.nodes.size)} spans`
      : `${fmtInt(this.rows.length)} of ${fmtInt(this.nodes.size)} spans shown`;
    for (const el of this.rendered.values()) el.remove();
    this.rendered.clear();
    // A collapse that hides the selection moves it up to the nearest visible ancestor.
    let sel = this.selected;
    while (sel && !this.rowIndex.has(sel)) sel = this.nodes.get(sel)?.parent;
    if (sel && sel !== this.selected) this.select(sel);
    this.schedule();
  }

  toggle(sid, open = !this.expanded.has(sid)) {
    const node = this.nodes.get(sid);
    if (!node || !node.span.children.length || open === this.expanded.has(sid)) return;
    if (open) this.expanded.add(sid);
    else this.expanded.delete(sid);
    this.recompute();
  }

  expandAll(open) {
    this.expanded.clear();
    if (open) {
      for (const [sid, n] of this.nodes) if (n.span.children.length) this.expanded.add(sid);
    }
    this.recompute();
    this.scrollToRow(this.rowIndex.get(this.selected), true);
  }

  revealAncestors(sid) {
    let p = this.nodes.get(sid)?.parent;
    while (p) {
      this.expanded.add(p);
      p = this.nodes.get(p)?.parent;
    }
  }

  // --- Waterfall: virtualized painting -------------------------------------------

  schedule() {
    if (!this.frame) this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.paint();
    });
  }

  /** Keeps exactly the rows in view (plus overscan) in the DOM. */
  paint() {
    const top = this.scroller.scrollTop;
    const height = this.scroller.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / ROW) - OVERSCAN);
    const last = Math.min(this.rows.length - 1, Math.ceil((top + height) / ROW) + OVERSCAN);
    for (const [i, el] of this.rendered) {
      if (i < first || i > last) {
        el.remove();
        this.rendered.delete(i);
      }
    }
    const fresh = document.createDocumentFragment();
    for (let i = first; i <= last; i++) {
      if (this.rendered.has(i)) continue;
      const el = this.row(this.rows[i], i);
      this.rendered.set(i, el);
      fresh.append(el);
    }
    this.canvas.append(fresh);
  }

  /** One row: the tree part (indent, toggle, kind, name, model) and the timeline bar. */
  row({ span, depth }, index) {
    const kids = span.children.length;
    const open = this.expanded.has(span.span_id);
    const err = span.status === 'ERROR';
    const kind = (span.llm_kind || 'UNKNOWN').toLowerCase();
    const model = span.llm_kind === 'LLM' ? span.response_model || span.request_model : null;
    const hidden = kids && !open ? this.nodes.get(span.span_id).descendants : 0;

    const tree = h('div', { class: 'wf-tree' },
      h('span', {
        class: 'wf-toggle',
        role: kids ? 'button' : null,
        'aria-label': kids ? (open ? 'collapse' : 'expand') : null,
      }, kids ? (open ? '▾' : '▸') : ''),
      kindBadge(span.llm_kind),
      h('span', { class: 'wf-name' }, span.name),
      err ? errorMark('✕', span.status_message || 'error') : null,
      model ? h('span', { class: 'muted wf-model' }, model) : null,
      hidden ? h('span', { class: 'muted wf-hidden' }, `+${fmtInt(hidden)}`) : null);
    tree.style.paddingLeft = `${4 + depth * INDENT}px`;

    const el = h('div', {
      class: `wf-row${err ? ' err' : ''}${span.span_id === this.selected ? ' sel' : ''}`,
      'data-span': span.span_id,
      'data-depth': depth,
      role: 'treeitem',
      'aria-level': depth + 1,
      'aria-expanded': kids ? String(open) : null,
      'aria-selected': String(span.span_id === this.selected),
      title: `${span.name} · ${fmtMs(span.duration_ms)}`,
    }, tree, h('div', { class: 'wf-bar-cell' }, this.bar(span, kind, err)));
    el.style.top = `${index * ROW}px`;
    return el;
  }

  /** The span's bar, placed by time on the trace's timeline, with its duration beside it. */
  bar(span, kind, err) {
    const start = (span.start_ns - this.t0) / this.durNs;
    const end = (span.end_ns - this.t0) / this.durNs;
    const bar = h('div', { class: `wf-bar kind-${kind}${err ? ' err' : ''}` });
    bar.style.left = `${start * 100}%`;
    bar.style.width = `${Math.max(0, end - start) * 100}%`;
    const label = h('span', { class: 'wf-label' }, fmtMs(span.duration_ms));
    if (end <= 0.8) {
      label.style.left = `calc(${end * 100}% + 4px)`;
    } else if (start >= 0.2) {
      label.style.right = `calc(${(1 - start) * 100}% + 4px)`;
    } else {
      label.classList.add('in');
      label.style.left = `calc(${start * 100}% + 4px)`;
    }
    return h('div', { class: 'wf-track' }, bar, label);
  }

  // --- Waterfall: selection and keys -------------------------------------------

  onClick(e) {
    const row = e.target.closest('.wf-row');
    if (!row) return;
    const sid = row.dataset.span;
    if (e.target.closest('.wf-toggle')) this.toggle(sid);
    else this.select(sid);
  }

  onKey(e) {
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    const i = this.rowIndex.get(this.selected) ?? 0;
    const node = this.nodes.get(this.selected);
    const last = this.rows.length - 1;
    let to = null;
    switch (e.key) {
      case 'ArrowDown': to = Math.min(last, i + 1); break;
      case 'ArrowUp': to = Math.max(0, i - 1); break;
      case 'Home': to = 0; break;
      case 'End': to = last; break;
      case 'PageDown': to = Math.min(last, i + Math.floor(this.scroller.clientHeight / ROW)); break;
      case 'PageUp': to = Math.max(0, i - Math.floor(this.scroller.clientHeight / ROW)); break;
      case 'ArrowRight':
        // Expand; on an expanded span, go to its first child.
        if (node?.span.children.length) {
          if (!this.expanded.has(this.selected)) this.toggle(this.selected, true);
          else to = i + 1;
        }
        break;
      case 'ArrowLeft':
        // Collapse; on a collapsed span or a leaf, go to its parent.
        if (node?.span.children.length && this.expanded.has(this.selected)) this.toggle(this.selected, false);
        else if (node?.parent) to = this.rowIndex.get(node.parent);
        break;
      case 'Enter':
      case ' ':
        if (node) this.toggle(this.selected);
        break;
      default:
        return;
    }
    e.preventDefault();
    if (to !== null && to !== undefined && this.rows[to]) {
      this.select(this.rows[to].span.span_id);
      this.scrollToRow(to, false);
    }
  }

  /** Scrolls the waterfall so that row `i` is in view (centred when `center`). */
  scrollToRow(i, center) {
    if (i === undefined || i === null) return;
    const s = this.scroller;
    const y = i * ROW;
    if (center) s.scrollTop = Math.max(0, y - (s.clientHeight - ROW) / 2);
    else if (y < s.scrollTop) s.scrollTop = y;
    else if (y + ROW > s.scrollTop + s.clientHeight) s.scrollTop = y + ROW - s.clientHeight;
    this.schedule();
  }

  select(sid) {
    if (!sid || sid === this.selected || !this.nodes.has(sid)) return;
    this.selected = sid;
    for (const el of this.rendered.values()) {
      const on = el.dataset.span === sid;
      el.classList.toggle('sel', on);
      el.setAttribute('aria-selected', String(on));
    }
    // Keep the selection in the address without re-rendering the page.
    history.replaceState(history.state, '', traceLink(this.trace.trace_id, sid, this.params));
    this.renderDetail();
  }

  // --- Detail panel --------------------------------------------------------------

  renderDetail() {
    const node = this.nodes.get(this.selected);
    if (!node) {
      mount(this.detail, h('p', { class: 'muted' }, 'This trace has no spans.'));
      return;
    }
    const span = node.span;
    this.spanScores = h('div', { class: 'scores-list span-scores' });
    this.renderSpanScores();
    this.scoreForm.target(span);
    mount(
      this.detail,
      spanSummary(span, this.t0),
      // What the span did comes first; annotating it follows.
      spanContent(span),
      eventsView(span),
      h('section', { class: 'sd-section' },
        h('h3', {}, 'Scores'),
        this.spanScores,
        this.scoreForm.el),
      linksView(span),
      attributesView(span),
    );
    this.detail.scrollTop = 0;
  }

  renderSpanScores() {
    if (!this.spanScores) return;
    const own = (this.trace.scores || []).filter((s) => s.span_id === this.selected);
    mount(this.spanScores, own.length ? own.map(scoreChip) : h('span', { class: 'muted' }, 'no scores on this span'));
  }

  /** Takes a re-fetched trace's scores (after a new score was saved). */
  updateScores(scores) {
    this.trace.scores = scores;
    this.renderTraceScores();
    this.renderSpanScores();
  }
}

// --- Tree helpers ----------------------------------------------------------------

/** span_id -> {span, depth, parent, descendants}, without recursion (deep trees are fine). */
function indexSpans(roots) {
  const nodes = new Map();
  const order = [];
  const stack = roots.map((s) => [s, 0, null]).reverse();
  while (stack.length) {
    const [span, depth, parent] = stack.pop();
    const node = { span, depth, parent, descendants: 0 };
    nodes.set(span.span_id, node);
    order.push(node);
    for (let i = span.children.length - 1; i >= 0; i--) stack.push([span.children[i], depth + 1, span.span_id]);
  }
  // Children come after their parent in `order`: sum the subtree sizes bottom-up.
  for (let i = order.length - 1; i >= 0; i--) {
    const n = order[i];
    if (n.parent) nodes.get(n.parent).descendants += n.descendants + 1;
  }
  return nodes;
}

/** The rows shown: depth-first, skipping the descendants of collapsed spans. */
function visibleRows(roots, expanded) {
  const out = [];
  const stack = roots.map((s) => [s, 0]).reverse();
  while (stack.length) {
    const [span, depth] = stack.pop();
    out.push({ span, depth });
    if (!expanded.has(span.span_id)) continue;
    for (let i = span.children.length - 1; i >= 0; i--) stack.push([span.children[i], depth + 1]);
  }
  return out;
}

// --- Span summary ----------------------------------------------------------------

/** The span's name, kind, status, and its LLM fields as a key/value list. */
function spanSummary(span, t0) {
  const err = span.status === 'ERROR';
  const a = span.attributes || {};
  const model = span.request_model && span.response_model && span.request_model !== span.response_model
    ? `${span.request_model} → ${span.response_model}`
    : span.response_model || span.request_model || a['embedding.model_name'] || null;
  const tokens = joinParts([
    numPart(span.input_tokens, 'in'),
    numPart(span.output_tokens, 'out'),
    numPart(span.total_tokens, 'total'),
  ]);
  const cost = joinParts([
    costPart(span.cost_input_usd, 'in'),
    costPart(span.cost_output_usd, 'out'),
    costPart(span.cost_total_usd, 'total'),
  ]);
  const prompt = span.prompt_name
    ? `${span.prompt_name}${span.prompt_version ? ` (${span.prompt_version})` : ''}`
    : span.prompt_version || null;
  return h('section', { class: 'sd-head' },
    h('h2', { class: 'sd-title' }, kindBadge(span.llm_kind), ' ', h('span', {}, span.name)),
    h('div', { class: 'sd-status' },
      h('span', { class: `status status-${String(span.status || 'UNSET').toLowerCase()}` }, span.status || 'UNSET'),
      err && span.status_message ? h('span', { class: 'status-message' }, span.status_message) : null),
    kvList([
      ['duration', fmtMs(span.duration_ms)],
      ['start', span.start_ns <= t0 ? 'at trace start' : `+${fmtMs((span.start_ns - t0) / 1e6)} from trace start`],
      ['service', span.service_name],
      ['span kind', span.span_kind],
      ['model', model],
      ['provider', span.provider],
      ['tokens', tokens],
      ['cache read', span.cache_read_tokens != null ? `${fmtInt(span.cache_read_tokens)} tokens` : null],
      ['reasoning', span.reasoning_tokens != null ? `${fmtInt(span.reasoning_tokens)} tokens` : null],
      ['cost', cost ? `${cost}${span.cost_source ? ` · priced as ${span.cost_source}` : ''}` : null],
      ['finish reason', span.finish_reason],
      ['user', span.user_id],
      ['session', span.session_id ? h('a', { href: sessionLink(span.session_id) }, span.session_id) : null],
      ['prompt', prompt],
      ['environment', span.environment],
      ['span id', h('code', {}, span.span_id)],
    ]));
}

function numPart(n, label) {
  return n === null || n === undefined ? null : `${fmtInt(n)} ${label}`;
}

function costPart(usd, label) {
  return usd === null || usd === undefined ? null : `${fmtCost(usd)} ${label}`;
}

function joinParts(parts) {
  const kept = parts.filter(Boolean);
  return kept.length ? kept.join(' · ') : null;
}

/** A `.kv` definition list of [label, value] pairs, leaving out empty values. */
function kvList(pairs) {
  const kept = pairs.filter(([, v]) => v !== null && v !== undefined && v !== '');
  return h('dl', { class: 'kv' }, kept.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

// --- Span content by kind --------------------------------------------------------

function spanContent(span) {
  switch ((span.llm_kind || '').toUpperCase()) {
    case 'LLM': return llmView(span);
    case 'RETRIEVER': return retrieverView(span);
    case 'RERANKER': return rerankerView(span);
    case 'EMBEDDING': return embeddingView(span);
    case 'TOOL': return toolView(span);
    default: return ioView(span);
  }
}

function section(title, ...body) {
  return h('section', { class: 'sd-section' }, h('h3', {}, title), ...body);
}

/** Input and output of an LLM span as a chat (or as text when they are not messages). */
function llmView(span) {
  return [
    span.input != null ? section('Input', messagesOrText(span.input)) : null,
    span.output != null ? section('Output', messagesOrText(span.output)) : null,
  ];
}

/** Input and output of any other span: messages when they are, else pretty text. */
function ioView(span) {
  if (span.input == null && span.output == null) return null;
  return [
    span.input != null ? section('Input', messagesOrText(span.input)) : null,
    span.output != null ? section('Output', messagesOrText(span.output)) : null,
  ];
}

function messagesOrText(text) {
  const messages = parseMessages(text);
  return messages ? chatView(messages) : textBlock(text);
}

/** Text, or pretty-printed JSON, in a <pre>. */
function textBlock(value) {
  return h('pre', { class: 'sd-text' }, prettyText(value));
}

/** A string as is, unless it is JSON; JSON (or a value) indented compactly. */
function prettyText(value) {
  if (typeof value !== 'string') return compactJson(value);
  const parsed = tryJson(value);
  return parsed === null ? value : compactJson(parsed);
}

/**
 * JSON indented like JSON.stringify(v, null, 2), except that short arrays and
 * objects stay on one line: rows of a SQL result read as rows.
 */
function compactJson(v, indent = '') {
  const one = JSON.stringify(v);
  if (one === undefined) return String(v);
  if (v === null || typeof v !== 'object' || indent.length + one.length <= 76) return one;
  const next = `${indent}  `;
  if (Array.isArray(v)) {
    if (!v.length) return '[]';
    return `[\n${v.map((x) => next + compactJson(x, next)).join(',\n')}\n${indent}]`;
  }
  const entries = Object.entries(v);
  if (!entries.length) return '{}';
  return `{\n${entries.map(([k, x]) => `${next}${JSON.stringify(k)}: ${compactJson(x, next)}`).join(',\n')}\n${indent}}`;
}

function chatView(messages) {
  return h('div', { class: 'chat' }, messages.map(messageView));
}

function messageView(m) {
  const role = String(m.role).toLowerCase();
  const safeRole = role.replace(/[^a-z0-9_-]/g, '') || 'unknown';
  const body = [];
  addContent(body, m.content);
  if (Array.isArray(m.parts)) addContent(body, m.parts);
  for (const call of asArray(m.tool_calls)) body.push(toolCallView(call));
  if (m.function_call) body.push(toolCallView(m.function_call));
  return h('div', { class: `msg msg-${safeRole}` },
    h('div', { class: 'role' },
      role,
      m.name ? h('span', { class: 'msg-name' }, ` · ${m.name}`) : null,
      m.tool_call_id ? h('span', { class: 'call-id', title: 'the tool call this answers' }, ` ↳ ${m.tool_call_id}`) : null),
    body);
}

function asArray(x) {
  return Array.isArray(x) ? x : [];
}

/** Appends a message's content: a string, an array of parts, or anything else as JSON. */
function addContent(body, content) {
  if (content === null || content === undefined || content === '') return;
  if (typeof content === 'string') {
    body.push(contentText(content));
  } else if (Array.isArray(content)) {
    for (const part of content) addPart(body, part);
  } else {
    body.push(textBlock(content));
  }
}

function addPart(body, part) {
  if (typeof part === 'string') {
    body.push(contentText(part));
    return;
  }
  if (!part || typeof part !== 'object') return;
  const type = String(part.type || '');
  if (type === 'tool_call' || type === 'tool_use' || type === 'function_call') {
    body.push(toolCallView(part));
  } else if (type === 'tool_call_response' || type === 'tool_result') {
    body.push(h('div', { class: 'call-id' }, `↳ ${part.id || part.tool_use_id || ''}`));
    addContent(body, part.response ?? part.content ?? part.result);
  } else if (typeof part.text === 'string' || typeof part.content === 'string') {
    body.push(contentText(part.text ?? part.content));
  } else if (/image|audio|file|blob|uri/.test(type)) {
    body.push(h('div', { class: 'muted' }, `[${type}]`));
  } else {
    body.push(textBlock(part));
  }
}

/** A message's text; JSON text (structured output) is pretty-printed. */
function contentText(text) {
  if (tryJson(text) !== null) return textBlock(text);
  return h('div', { class: 'msg-text' }, text);
}

/** A tool call: its function name and pretty-printed arguments. */
function toolCallView(call) {
  const name = call.name ?? call.function?.name ?? '(unnamed)';
  const args = call.arguments ?? call.function?.arguments ?? call.input ?? call.args;
  return h('div', { class: 'tool-call' },
    h('div', {}, h('span', { class: 'fn' }, name), call.id ? h('span', { class: 'muted call-id' }, ` ${call.id}`) : null),
    args === undefined || args === null || args === '' ? null : textBlock(args));
}

// Retrieval ---------------------------------------------------------------------

/** Documents from `{"documents": […]}` or a bare array, else null. */
function docsFromJson(text) {
  const parsed = typeof text === 'string' ? tryJson(text) : text;
  const docs = Array.isArray(parsed) ? parsed : parsed?.documents;
  if (!Array.isArray(docs) || !docs.length) return null;
  if (!docs.every((d) => d && typeof d === 'object')) return null;
  return docs;
}

/** Documents from flattened attributes `<prefix>.N.document.{id,content,score,metadata}`. */
function docsFromAttributes(attrs, prefix) {
  const byIndex = new Map();
  const re = new RegExp(`^${prefix.replace(/\./g, '\\.')}\\.(\\d+)\\.document\\.(\\w+)$`);
  for (const [k, v] of Object.entries(attrs || {})) {
    const m = re.exec(k);
    if (!m) continue;
    const i = Number(m[1]);
    if (!byIndex.has(i)) byIndex.set(i, {});
    byIndex.get(i)[m[2]] = m[2] === 'metadata' && typeof v === 'string' ? tryJson(v) ?? v : v;
  }
  if (!byIndex.size) return null;
  return [...byIndex.keys()].sort((a, b) => a - b).map((i) => byIndex.get(i));
}

function retrieverView(span) {
  const docs = docsFromJson(span.output) || docsFromAttributes(span.attributes, 'retrieval.documents');
  return [
    span.input != null ? section('Query', textBlock(span.input)) : null,
    docs ? section(`Documents (${docs.length})`, docsList(docs)) : ioView({ output: span.output }),
  ];
}

function rerankerView(span) {
  const a = span.attributes || {};
  const inputDocs = docsFromJson(span.input) || docsFromAttributes(a, 'reranker.input_documents');
  const outputDocs = docsFromJson(span.output) || docsFromAttributes(a, 'reranker.output_documents');
  const query = a['reranker.query'] ?? (docsFromJson(span.input) ? null : span.input);
  // Where each document ranked before reranking, to show how it moved.
  const before = new Map((inputDocs || []).map((d, i) => [d.id, i + 1]));
  return [
    query != null ? section('Query', textBlock(query)) : null,
    kvList([
      ['model', a['reranker.model_name'] !== span.request_model ? a['reranker.model_name'] : null],
      ['top k', a['reranker.top_k']],
    ]),
    outputDocs
      ? section(`Reranked (${outputDocs.length})`, docsList(outputDocs, before))
      : span.output != null ? section('Output', textBlock(span.output)) : null,
    inputDocs
      ? h('details', { class: 'sd-more' },
        h('summary', {}, `Input documents (${inputDocs.length})`),
        docsList(inputDocs))
      : null,
  ];
}

/** A ranked list of documents: rank, title, score with a bar, content, source. */
function docsList(docs, before) {
  const scores = docs.map((d) => Number(d.score)).filter((s) => Number.isFinite(s));
  // Scores are usually in [0, 1]; other scales are drawn relative to the largest.
  const max = Math.max(1, ...scores.map(Math.abs));
  return h('ol', { class: 'docs' }, docs.map((d, i) => {
    const meta = d.metadata && typeof d.metadata === 'object' ? d.metadata : {};
    const score = Number(d.score);
    const hasScore = d.score !== null && d.score !== undefined && Number.isFinite(score);
    const bar = h('div', { class: 'scorebar' });
    bar.style.width = `${hasScore ? Math.max(0, Math.min(1, Math.abs(score) / max)) * 100 : 0}%`;
    const was = before && d.id !== undefined ? before.get(d.id) : undefined;
    return h('li', { class: 'doc', 'data-id': d.id ?? null },
      hasScore ? h('span', { class: 'score' }, fmtScore(score)) : null,
      h('div', { class: 'doc-title' },
        h('span', { class: 'doc-rank' }, `#${i + 1}`),
        h('b', {}, meta.title || d.id || `document ${i + 1}`),
        was !== undefined && was !== i + 1 ? h('span', { class: 'muted doc-moved' }, ` (was #${was})`) : null),
      hasScore ? bar : null,
      d.content != null ? h('div', { class: 'doc-content' }, typeof d.content === 'string' ? d.content : JSON.stringify(d.content)) : null,
      meta.source ? h('div', { class: 'doc-source muted' }, 'source: ', h('span', { class: 'mono' }, String(meta.source))) : null);
  }));
}

// Embedding ---------------------------------------------------------------------

function embeddingView(span) {
  const a = span.attributes || {};
  // Texts and vectors from `embedding.embeddings.N.embedding.{text,vector}`.
  const texts = [];
  let dims = Number(a['gen_ai.embeddings.dimension.count']) || null;
  for (const [k, v] of Object.entries(a)) {
    const m = /^embedding\.embeddings\.(\d+)\.embedding\.(text|vector)$/.exec(k);
    if (!m) continue;
    if (m[2] === 'text') texts.push([Number(m[1]), String(v)]);
    else if (!dims) {
      const vec = Array.isArray(v) ? v : tryJson(v);
      if (Array.isArray(vec)) dims = vec.length;
    }
  }
  texts.sort((x, y) => x[0] - y[0]);
  let list = texts.map(([, t]) => t);
  if (!list.length && span.input != null) {
    const parsed = tryJson(span.input);
    list = Array.isArray(parsed) ? parsed.map((t) => (typeof t === 'string' ? t : JSON.stringify(t))) : [String(span.input)];
  }
  const model = span.response_model || span.request_model || a['embedding.model_name'] || a['gen_ai.request.model'];
  return [
    section('Embedding', kvList([
      ['model', model],
      ['texts', fmtInt(list.length)],
      ['dimensions', dims ? fmtInt(dims) : 'unknown'],
    ])),
    list.length
      ? section('Texts', h('ol', { class: 'emb-texts' }, list.map((t) => h('li', {}, t))))
      : null,
  ];
}

// Tool --------------------------------------------------------------------------

function toolView(span) {
  const a = span.attributes || {};
  const name = a['gen_ai.tool.name'] || a['tool.name'] || span.name;
  return [
    section('Tool', kvList([
      ['name', h('span', { class: 'mono' }, name)],
      ['description', a['gen_ai.tool.description'] || a['tool.description']],
      ['call id', a['gen_ai.tool.call.id'] || a['tool_call.id']],
    ])),
    section('Arguments', span.input != null ? textBlock(span.input) : h('p', { class: 'muted' }, 'none recorded')),
    section('Result', span.output != null ? textBlock(span.output) : h('p', { class: 'muted' }, 'none recorded')),
  ];
}

// Events, links, attributes -----------------------------------------------------

function eventTime(ev) {
  const t = ev.time_ns ?? ev.time_unix_nano ?? ev.timestamp_ns ?? ev.timestamp;
  return typeof t === 'number' ? t : null;
}

function eventsView(span) {
  const events = asArray(span.events);
  if (!events.length) return null;
  return section(`Events (${events.length})`, h('div', { class: 'events' }, events.map((ev) => {
    const attrs = ev.attributes || {};
    const t = eventTime(ev);
    const at = t !== null ? h('span', { class: 'muted' }, ` +${fmtMs((t - span.start_ns) / 1e6)}`) : null;
    if (ev.name === 'exception') {
      const rest = Object.entries(attrs).filter(([k]) => !['exception.type', 'exception.message', 'exception.stacktrace'].includes(k));
      return h('div', { class: 'ev exception' },
        h('div', {}, h('b', {}, 'exception'), at),
        h('div', { class: 'ex-type' }, attrs['exception.type'] || 'unknown type'),
        attrs['exception.message'] ? h('div', { class: 'ex-message' }, attrs['exception.message']) : null,
        attrs['exception.stacktrace'] ? h('pre', { class: 'ex-stack' }, attrs['exception.stacktrace']) : null,
        rest.length ? attrList(Object.fromEntries(rest)) : null);
    }
    return h('div', { class: 'ev' },
      h('div', {}, h('b', {}, ev.name || 'event'), at),
      Object.keys(attrs).length ? attrList(attrs) : null);
  })));
}

function linksView(span) {
  const links = asArray(span.links);
  if (!links.length) return null;
  return section(`Links (${links.length})`, h('ul', { class: 'sd-links' }, links.map((l) => {
    const tid = l.trace_id || l.traceId;
    const sid = l.span_id || l.spanId;
    return h('li', {},
      tid ? h('a', { href: traceLink(tid, sid) }, h('code', {}, `${tid}${sid ? ` / ${sid}` : ''}`)) : textBlock(l),
      l.attributes && Object.keys(l.attributes).length ? attrList(l.attributes) : null);
  })));
}

/** Attributes, resource and scope, folded away. */
function attributesView(span) {
  const attrs = span.attributes || {};
  const res = span.resource || {};
  const scope = span.scope || {};
  return [
    h('details', { class: 'sd-more', open: Object.keys(attrs).length <= 8 ? true : null },
      h('summary', {}, `Attributes (${Object.keys(attrs).length})`),
      attrList(attrs)),
    h('details', { class: 'sd-more' },
      h('summary', {}, `Resource (${Object.keys(res).length})`),
      attrList(res),
      scope.name ? h('p', { class: 'muted' }, `scope ${scope.name}${scope.version ? ` ${scope.version}` : ''}`) : null),
  ];
}

/** Attributes as a `.kv` list sorted by key; JSON string values pretty-printed. */
function attrList(attrs) {
  const keys = Object.keys(attrs).sort();
  if (!keys.length) return h('p', { class: 'muted' }, 'none');
  return h('dl', { class: 'kv attrs' }, keys.map((k) => {
    const v = attrs[k];
    let value;
    if (typeof v === 'string') value = tryJson(v) !== null ? h('pre', {}, prettyText(v)) : v;
    else if (v !== null && typeof v === 'object') value = h('pre', {}, compactJson(v));
    else value = String(v);
    return [h('dt', { class: 'mono' }, k), h('dd', {}, value)];
  }));
}

// --- Scores ------------------------------------------------------------------------

function fmtScore(x) {
  if (!Number.isFinite(x)) return String(x);
  return String(Number(x.toFixed(Math.abs(x) >= 100 ? 1 : 3)));
}

/** A score's shown value: the number, or the label of a boolean or category. */
function scoreValue(s) {
  if (s.data_type === 'numeric' && typeof s.value === 'number') return fmtScore(s.value);
  if (s.label !== null && s.label !== undefined) return s.label;
  return s.value === null || s.value === undefined ? '–' : String(s.value);
}

function scoreChip(s) {
  const title = [`${s.name} = ${scoreValue(s)}`, `source: ${s.source}`, s.comment ? `comment: ${s.comment}` : null, s.created ? `created ${fmtTime(s.created)}` : null]
    .filter(Boolean).join('\n');
  return h('span', { class: `score-chip score-${s.data_type || 'numeric'}`, title, 'data-score': s.id },
    h('b', {}, s.name), ' = ', scoreValue(s), ' ', h('span', { class: 'muted' }, s.source),
    s.comment ? h('span', { class: 'muted score-comment' }, ' ✎') : null);
}

/** 'true'/'false' → boolean, a number → number, anything else → a category. */
function parseScoreValue(text) {
  const t = text.trim();
  if (/^(true|false)$/i.test(t)) return t.toLowerCase() === 'true';
  if (/^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i.test(t)) return Number(t);
  return t;
}

/** The "Add score" form of the detail panel: kept across selections, aimed at the selected span. */
class ScoreForm {
  constructor(view) {
    this.view = view;
    const writable = view.me ? view.me.scores_writable !== false : true;
    this.name = h('input', { name: 'name', required: true, placeholder: 'name, e.g. helpful', 'aria-label': 'score name', autocomplete: 'off' });
    this.value = h('input', { name: 'value', required: true, placeholder: '0.8, true or a label', 'aria-label': 'score value', autocomplete: 'off' });
    this.comment = h('input', { name: 'comment', placeholder: 'comment (optional)', 'aria-label': 'comment', autocomplete: 'off' });
    this.whole = h('input', { type: 'checkbox', name: 'whole-trace' });
    this.targetNote = h('span', { class: 'muted' });
    this.status = h('div', { class: 'score-status', 'aria-live': 'polite' });
    this.submit = h('button', { type: 'submit', class: 'primary' }, 'Add score');
    this.whole.addEventListener('change', () => this.describeTarget());
    this.el = h('form', { id: 'score-form', class: 'score-form', onsubmit: (e) => this.onSubmit(e) },
      h('fieldset', { disabled: writable ? null : true },
        h('legend', {}, 'Add score ', this.targetNote),
        h('div', { class: 'score-fields' }, this.name, this.value, this.comment),
        h('div', { class: 'score-actions' },
          h('label', {}, this.whole, ' whole trace'),
          this.submit)),
      writable ? null : h('p', { class: 'muted' },
        'This key cannot write scores here: scores are written to the ingest endpoint (OTLP/HTTP port) with an ingest key.'),
      this.status);
  }

  /** Called when the selection changes. */
  target(span) {
    this.span = span;
    this.describeTarget();
  }

  describeTarget() {
    this.targetNote.textContent = this.whole.checked ? '(whole trace)' : `(span ${this.span?.name ?? ''})`;
  }

  async onSubmit(e) {
    e.preventDefault();
    const name = this.name.value.trim();
    const raw = this.value.value.trim();
    if (!name || !raw) {
      mount(this.status, errorBox('A score needs a name and a value.'));
      return;
    }
    const trace = this.view.trace;
    const body = { trace_id: trace.trace_id, name, value: parseScoreValue(raw), source: 'human' };
    if (!this.whole.checked && this.span) body.span_id = this.span.span_id;
    const comment = this.comment.value.trim();
    if (comment) body.comment = comment;

    this.submit.disabled = true;
    mount(this.status, h('span', { class: 'muted' }, 'saving…'));
    try {
      const res = await post('/api/v1/scores', body);
      this.name.value = '';
      this.value.value = '';
      this.comment.value = '';
      mount(this.status, h('span', { class: 'muted' }, 'saved, appearing…'));
      const shown = await this.waitFor(res?.ids || []);
      mount(this.status, h('span', { class: shown ? 'ok' : 'muted' },
        shown ? 'saved' : 'saved; it is not visible yet and will appear after the next flush (reload later)'));
    } catch (err) {
      mount(this.status, errorBox(err));
    } finally {
      this.submit.disabled = false;
    }
  }

  /** Asks for the trace's scores (not the whole trace, which may be megabytes) until
   * every new score id is among them (or the time is up). */
  async waitFor(ids) {
    const deadline = Date.now() + SCORE_POLL_MAX_MS;
    // Scores are listed by when they were made: from a day before the trace began.
    const start = Math.floor(this.view.trace.start_ns / 1e9) - 86400;
    while (Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, SCORE_POLL_MS));
      if (!this.el.isConnected) return false; // the page was left
      try {
        const list = await api('/api/v1/scores', { trace_id: this.view.trace.trace_id, start, limit: 1000 });
        const fresh = [...(list.scores || [])].sort((a, b) => a.created_ns - b.created_ns);
        const have = new Set(fresh.map((s) => s.id));
        if (ids.every((i) => have.has(i))) {
          this.view.updateScores(fresh);
          return true;
        }
      } catch {
        // a failed poll is retried until the deadline
      }
    }
    return false;
  }
}
