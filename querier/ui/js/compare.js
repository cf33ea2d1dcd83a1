// Two runs of the same request side by side: their totals with deltas, the spans
// the API aligned (GET /api/v1/compare) with what differs highlighted, the output
// texts that differ, and the spans found in only one run.
//
// URL: #/compare?a=<trace>&b=<trace>, or #/compare?a=<trace>&prev=1 for A's run of a
// day before: the latest trace with the same root name that started in the 24 h
// ending 24 h before A (the hash is then replaced with the resolved b).

import {
  api, errorBox, errorMark, fetchTrace, fmtCost, fmtInt, fmtMs, fmtRelative, fmtSigned, fmtTime, h, isAuthError,
  kindBadge, link, mount, navigate, traceLink, walkSpans,
} from './core.js';

const DAY_S = 86400;
/** Characters of a long common prefix kept before the texts part. */
const PREFIX_TAIL = 120;

export async function render(root, route) {
  const a = clean(route.params.a);
  let b = clean(route.params.b);

  if (a && !b && route.params.prev) {
    const found = await previousRun(a).catch((e) => ({ error: e }));
    // The user may have moved on meanwhile: then this page must not steer.
    if (!root.isConnected) return;
    if (isAuthError(found.error)) throw found.error;
    if (found.b) {
      location.replace(link('compare', { a, b: found.b })); // the router renders it
      return;
    }
    mount(root, title(), found.error ? errorBox(found.error) : null,
      picker({ a, note: found.note }), found.others ? recentRuns(a, found.others) : null);
    return;
  }
  if (!a || !b) {
    mount(root, title(), picker({ a, b, note: 'Pick two traces to compare: paste their ids, or tick two rows of the trace list.' }));
    return;
  }

  // The comparison, and both traces for the values that did not change.
  const [cmp, ta, tb] = await Promise.allSettled([
    api('/api/v1/compare', { a, b }),
    fetchTrace(a),
    fetchTrace(b),
  ]);
  if (cmp.status === 'rejected') {
    if (isAuthError(cmp.reason)) throw cmp.reason;
    mount(root, title(), errorBox(cmp.reason), picker({ a, b }));
    return;
  }
  const c = cmp.value;
  const spansA = spanIndex(ta.value);
  const spansB = spanIndex(tb.value);
  const sameRoot = c.a.root_name === c.b.root_name;

  mount(
    root,
    title(
      h('button', { type: 'button', id: 'compare-swap', onclick: () => navigate('compare', { a: b, b: a }) }, 'Swap A and B'),
      h('a', { href: link('compare', { a, prev: 1 }), title: 'A against the latest run of the same request a day earlier' }, 'A vs a day before'),
      h('a', { href: link('compare') }, 'Pick other traces'),
    ),
    sameRoot ? null : h('div', { class: 'cmp-warning' },
      `These are different requests (${c.a.root_name} and ${c.b.root_name}): only spans with the same names align.`),
    h('div', { class: 'compare-grid cmp-heads' },
      side('A', 'compare-a', c.a, ta.value, null),
      side('B', 'compare-b', c.b, tb.value, c)),
    pairsSection(c, a, b, spansA, spansB),
    outputsSection(c),
    onlySection(c, a, b),
  );
}

/** A trace id from what was pasted: an id, or a link holding one. */
function clean(v) {
  if (!v) return '';
  const m = /[0-9a-f]{32}/i.exec(v);
  return (m ? m[0] : v.trim()).toLowerCase();
}

function title(...actions) {
  return h('div', { class: 'toolbar' }, h('h1', { class: 'page-title' }, 'Compare'), h('span', { class: 'spacer' }), actions);
}

// --- Resolving "a day before" ---------------------------------------------------

/**
 * The latest trace with A's root name that started in the 24 h ending 24 h before
 * A started: {b}, or {note, others} when there is none.
 */
async function previousRun(a) {
  const ta = await fetchTrace(a);
  const startS = Math.floor(ta.start_ns / 1e9);
  const window = { start: startS - 2 * DAY_S, end: startS - DAY_S };
  // `name` matches any span's name: keep the traces whose root has it.
  const res = await api('/api/v1/traces', { name: ta.root_name, ...window, limit: 100 });
  const hit = res.traces.find((t) => t.root_name === ta.root_name && t.trace_id !== a);
  if (hit) return { b: hit.trace_id };
  const recent = await api('/api/v1/traces', { name: ta.root_name, since: '7d', limit: 50 }).catch(() => null);
  return {
    note: `No run of “${ta.root_name}” started between ${fmtTime(window.start * 1e9)} and ${fmtTime(window.end * 1e9)}, `
      + 'a day before this one. Paste a trace id to compare with, or pick a recent run below.',
    others: (recent?.traces || []).filter((t) => t.root_name === ta.root_name && t.trace_id !== a).slice(0, 10),
  };
}

/** Recent runs of A's request, each a link comparing A with it. */
function recentRuns(a, others) {
  if (!others.length) return null;
  return h('div', { class: 'panel cmp-recent' },
    h('h3', {}, 'Recent runs of the same request'),
    h('ul', {}, others.map((t) => h('li', {},
      h('a', { href: link('compare', { a, b: t.trace_id }) }, fmtTime(t.start_ns)),
      ' ', h('span', { class: 'muted' }, `${fmtMs(t.duration_ms)}, ${fmtInt(t.total_tokens)} tokens, ${fmtCost(t.cost_usd)}`),
      t.error ? errorMark(' ✕', null) : null))));
}

/** The form asking for two trace ids. */
function picker({ a = '', b = '', note }) {
  const inA = h('input', { id: 'compare-input-a', name: 'a', value: a, placeholder: 'trace id (32 hex)', class: 'mono', spellcheck: 'false' });
  const inB = h('input', { id: 'compare-input-b', name: 'b', value: b, placeholder: 'trace id (32 hex)', class: 'mono', spellcheck: 'false' });
  return h('form', {
    class: 'panel cmp-picker',
    id: 'compare-picker',
    onsubmit: (e) => {
      e.preventDefault();
      navigate('compare', { a: clean(inA.value), b: clean(inB.value) });
    },
  },
  note ? h('p', { class: 'cmp-note' }, note) : null,
  h('div', { class: 'cmp-inputs' },
    h('label', {}, 'Trace A', inA),
    h('label', {}, 'Trace B', inB),
    h('button', { type: 'submit', class: 'primary' }, 'Compare')),
  h('p', { class: 'muted' }, 'Or ', h('a', { href: link('traces') }, 'pick two traces in the trace list'),
    ' (tick two rows, then “Compare picked”)',
    a && !b ? [', or compare A with ', h('a', { href: link('compare', { a, prev: 1 }), id: 'compare-prev' }, 'its run a day before')] : null,
    '.'));
}

// --- Header panels --------------------------------------------------------------

/** One trace's totals; B's carry their change from A. */
function side(label, id, t, detail, cmp) {
  const d = cmp?.totals_diff;
  const a = cmp?.a;
  const delta = (diff, base, format) => (d ? changeMark(diff, base ? diff / Math.abs(base) : null, format) : null);
  const row = (name, value, change) => [h('dt', {}, name), h('dd', {}, value, change ? ' ' : null, change)];
  return h('section', { class: `panel cmp-side side-${label.toLowerCase()}`, id },
    h('div', { class: 'cmp-side-head' },
      h('span', { class: 'cmp-label' }, label),
      h('a', { href: traceLink(t.trace_id), class: 'cmp-root' }, t.root_name || t.trace_id),
      t.error ? errorMark('✕ error', null) : h('span', { class: 'ok-mark' }, 'ok')),
    h('div', { class: 'mono muted cmp-id' }, t.trace_id),
    h('dl', { class: 'kv cmp-totals' },
      row('started', detail ? fmtTime(detail.start_ns) : '–'),
      row('service', detail?.root_service || '–'),
      row('duration', fmtMs(t.duration_ms), delta(d?.duration_ms, a?.duration_ms, fmtMs)),
      row('spans', fmtInt(t.span_count), delta(d?.span_count, a?.span_count, fmtInt)),
      row('tokens', fmtInt(t.total_tokens), delta(d?.total_tokens, a?.total_tokens, fmtInt)),
      row('cost', fmtCost(t.cost_usd), delta(d?.cost_usd, a?.cost_usd, fmtCost))));
}

/** "+1.20 s (+35 %)", red when it grew, green when it shrank. */
function changeMark(delta, relative, format) {
  if (delta === null || delta === undefined || delta === 0) return h('span', { class: 'cmp-delta same' }, '±0');
  return h('span', { class: `cmp-delta ${delta > 0 ? 'up' : 'down'}` },
    fmtSigned(delta, format), relative !== null && relative !== undefined ? ` (${fmtRelative(relative)})` : '');
}

// --- Aligned spans ----------------------------------------------------------------

/** span_id → span of a trace answer (null when the trace failed to load). */
function spanIndex(detail) {
  const map = new Map();
  walkSpans(detail?.roots, (s) => {
    map.set(s.span_id, s);
  });
  return map;
}

/** The table's per-side columns: [label, the diff fields marking it]. */
const COLS = [
  ['model', ['model', 'prompt_version']],
  ['duration', ['duration_ms']],
  ['tokens', ['total_tokens', 'input_tokens', 'output_tokens']],
  ['cost', ['cost_usd']],
  ['status', ['status']],
];

/** A side's values of a span, from the trace, else from the differences. */
function values(span, diffs, which) {
  const from = (f) => diffs.get(f)?.[which];
  if (!span) {
    return {
      model: from('model'), prompt: from('prompt_version'), duration: from('duration_ms'),
      tokens: from('total_tokens'), tokensIn: from('input_tokens'), tokensOut: from('output_tokens'),
      cost: from('cost_usd'), status: from('status'),
    };
  }
  return {
    model: span.response_model || span.request_model,
    prompt: span.prompt_version,
    duration: span.duration_ms,
    tokens: span.total_tokens,
    tokensIn: span.input_tokens,
    tokensOut: span.output_tokens,
    cost: span.cost_total_usd,
    status: span.status,
  };
}

/** The cells of one side; on B, a changed number also shows its delta. */
function sideCells(v, diffs, isB) {
  const changed = (fields) => fields.some((f) => diffs.has(f));
  const cell = (fields, num, content, deltaField, format, title) => {
    const d = isB && deltaField ? diffs.get(deltaField) : null;
    return h('td', { class: [num ? 'num' : '', changed(fields) ? 'diff' : ''].join(' ').trim() || null, title: title || null },
      content,
      d && d.delta !== undefined ? h('div', {}, changeMark(d.delta, d.relative, format)) : null);
  };
  const tokensField = ['total_tokens', 'input_tokens', 'output_tokens'].find((f) => diffs.has(f));
  const status = v.status ? String(v.status).toUpperCase() : '';
  return [
    cell(COLS[0][1], false, [v.model || h('span', { class: 'muted' }, '–'),
      v.prompt ? h('span', { class: 'muted' }, ` · ${v.prompt}`) : null], null, null, v.prompt ? `prompt version ${v.prompt}` : null),
    cell(COLS[1][1], true, fmtMs(v.duration), 'duration_ms', fmtMs),
    cell(COLS[2][1], true, v.tokens ? fmtInt(v.tokens) : '–', tokensField, fmtInt,
      v.tokens ? `${fmtInt(v.tokensIn)} in, ${fmtInt(v.tokensOut)} out` : null),
    cell(COLS[3][1], true, v.cost !== null && v.cost !== undefined ? fmtCost(v.cost) : '–', 'cost_usd', fmtCost),
    cell(COLS[4][1], false, status === 'ERROR' ? h('span', { class: 'err-mark' }, 'ERROR') : status || '–'),
  ];
}

/** Depth of an API span path ("root#0/child#1" is 1). */
const depth = (path) => (path.match(/\//g) || []).length;

function pairsSection(c, a, b, spansA, spansB) {
  const differing = c.aligned.filter((p) => !p.same).length;
  const rows = c.aligned.map((p, i) => {
    const diffs = new Map(p.differences.map((d) => [d.field, d]));
    const output = diffs.get('output');
    return h('tr', { class: p.same ? 'same' : 'differs', 'data-path': p.path },
      h('td', { class: 'name', title: p.path },
        h('span', { class: 'cmp-indent', style: { paddingLeft: `${depth(p.path) * 14}px` } },
          h('a', { href: traceLink(a, p.a_span_id), title: 'open in A' }, p.name),
          ' ', h('a', { href: traceLink(b, p.b_span_id), class: 'muted cmp-open-b', title: 'open in B' }, '↗B'))),
      h('td', {}, kindBadge(p.llm_kind)),
      sideCells(values(spansA.get(p.a_span_id), diffs, 'a'), diffs, false),
      sideCells(values(spansB.get(p.b_span_id), diffs, 'b'), diffs, true),
      h('td', { class: output ? 'diff' : null },
        output ? h('a', { href: `#out-${i}`, onclick: (e) => jump(e, `out-${i}`) }, 'differs ↓') : h('span', { class: 'muted' }, 'same')));
  });

  const table = h('table', { class: 'list cmp-pairs', id: 'compare-pairs' },
    h('thead', {},
      h('tr', { class: 'cmp-groups' }, h('th', { colspan: 2 }, ''),
        h('th', { colspan: 5, class: 'side-a' }, 'A'), h('th', { colspan: 5, class: 'side-b' }, 'B'), h('th', {}, '')),
      h('tr', {}, h('th', {}, 'span'), h('th', {}, 'kind'),
        [0, 1].map(() => COLS.map(([label], i) => h('th', { class: i >= 1 && i <= 3 ? 'num' : null }, label))),
        h('th', {}, 'output'))),
    h('tbody', {}, rows));

  const hide = h('input', {
    type: 'checkbox',
    id: 'compare-hide-same',
    onchange: (e) => table.classList.toggle('hide-same', e.target.checked),
  });
  return h('section', { class: 'cmp-section' },
    h('div', { class: 'cmp-section-head' },
      h('h2', {}, `Aligned spans (${c.aligned.length}, ${differing} differ)`),
      h('label', { class: 'inline-label' }, hide, 'hide identical pairs')),
    c.aligned.length ? table : h('div', { class: 'empty' }, 'No span aligns: the two traces share no span name at the top.'));
}

/** Scrolls to an element without changing the hash (the hash is the route). */
function jump(e, id) {
  e.preventDefault();
  document.getElementById(id)?.scrollIntoView({ behavior: 'smooth', block: 'start' });
}

// --- Output texts -------------------------------------------------------------------

function outputsSection(c) {
  const blocks = [];
  c.aligned.forEach((p, i) => {
    const d = p.differences.find((x) => x.field === 'output');
    if (!d) return;
    const t = d.text || {};
    blocks.push(h('div', { class: 'cmp-output', id: `out-${i}` },
      h('h3', {}, p.name, ' ', h('span', { class: 'muted mono' }, p.path)),
      h('div', { class: 'compare-grid' },
        textSide('A', d.a, t.a_chars, t.a_truncated, t.common_prefix_chars || 0),
        textSide('B', d.b, t.b_chars, t.b_truncated, t.common_prefix_chars || 0))));
  });
  if (!blocks.length) return null;
  return h('section', { class: 'cmp-section' }, h('h2', {}, `Outputs that differ (${blocks.length})`), blocks);
}

/**
 * One side's output: the prefix both share, dimmed (a long one cut to its end), then
 * the part that differs, highlighted.
 */
function textSide(label, text, chars, truncated, prefix) {
  if (text === null || text === undefined) {
    return h('div', { class: 'cmp-text' }, h('div', { class: 'cmp-text-head' }, label), h('div', { class: 'muted' }, 'no output'));
  }
  const cps = Array.from(String(text)); // the API counts Unicode scalar values
  const shared = cps.slice(0, prefix).join('');
  const rest = cps.slice(prefix).join('');
  const shown = shared.length > PREFIX_TAIL ? `…${shared.slice(-PREFIX_TAIL)}` : shared;
  return h('div', { class: 'cmp-text' },
    h('div', { class: 'cmp-text-head' }, label, ' ',
      h('span', { class: 'muted' }, `${fmtInt(chars ?? cps.length)} characters${prefix ? `, first ${fmtInt(prefix)} shared` : ''}`
        + `${truncated ? `, cut at ${fmtInt(cps.length)}` : ''}`)),
    h('pre', {}, shown ? h('span', { class: 'cmp-shared', title: `${fmtInt(prefix)} characters in common` }, shown) : null,
      h('span', { class: 'cmp-changed' }, rest), truncated ? h('span', { class: 'muted' }, ' …') : null));
}

// --- Spans in one run only -------------------------------------------------------------

function onlySection(c, a, b) {
  const list = (spans, trace, cls, label) => h('div', { class: 'panel cmp-only' },
    h('h3', {}, `${label} (${spans.length})`),
    spans.length
      ? h('ul', { class: 'cmp-only-list' }, spans.map((s) => h('li', { class: cls, title: s.path },
        h('span', { class: 'cmp-indent', style: { paddingLeft: `${depth(s.path) * 14}px` } },
          kindBadge(s.llm_kind), ' ', h('a', { href: traceLink(trace, s.span_id) }, s.name)),
        h('span', { class: 'muted num' }, fmtMs(s.duration_ms), s.cost_usd ? `, ${fmtCost(s.cost_usd)}` : ''))))
      : h('div', { class: 'muted' }, 'none'));
  return h('section', { class: 'cmp-section' },
    h('h2', {}, 'Spans in one run only'),
    h('div', { class: 'compare-grid' },
      list(c.only_in_a, a, 'only-a', 'Only in A'),
      list(c.only_in_b, b, 'only-b', 'Only in B')));
}
