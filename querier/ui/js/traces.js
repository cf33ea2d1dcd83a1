// The trace list: filters in the URL (a link shares the view), sortable columns, and
// two rows picked to compare.

import {
  api, errorBox, errorMark, fmtCost, fmtInt, fmtMs, fmtTime, fmtAgo, go, h, link, mount, navigate, rangePicker,
  rangeParams, traceLink,
} from './core.js';

/** The search API's filters, as the URL carries them. */
const FILTERS = [
  ['service', 'service'],
  ['name', 'root or span name'],
  ['model', 'model'],
  ['user_id', 'user'],
  ['session_id', 'session'],
  ['prompt_name', 'prompt'],
  ['prompt_version', 'prompt version'],
  ['min_duration', 'min duration', 'narrow', '2s'],
  ['max_duration', 'max duration', 'narrow', '10s'],
  ['min_cost', 'min cost $', 'narrow', '0.01'],
  ['score', 'score', '', 'faithfulness<0.5'],
];
const KINDS = ['', 'LLM', 'TOOL', 'RETRIEVER', 'EMBEDDING', 'RERANKER', 'AGENT', 'CHAIN', 'GUARDRAIL', 'EVALUATOR'];
/** Columns: [summary field, label, numeric, the API's order name]. */
const COLUMNS = [
  ['start_ns', 'started', false, null],
  ['root_name', 'trace', false, undefined],
  ['duration_ms', 'duration', true, 'duration'],
  ['span_count', 'spans', true, 'spans'],
  ['total_tokens', 'tokens', true, 'tokens'],
  ['cost_usd', 'cost', true, 'cost'],
];
/** Page parameters that are not API filters. */
const VIEW = ['sort', 'dir', 'pick'];

export async function render(root, route) {
  // A link with a start (from a dashboard bucket) gives its own range.
  const p = rangeParams(route.params, { since: '24h', limit: '100' });
  const params = Object.fromEntries(Object.entries(p).filter(([k]) => !VIEW.includes(k)));
  // The server sorts the whole range, so "most expensive" means of all matching traces.
  const sort = p.sort || 'start_ns';
  const dir = p.dir || 'desc';
  const column = COLUMNS.find(([key]) => key === sort);
  if (column && column[3] === null) params.order = dir === 'asc' ? 'oldest' : 'newest';
  else if (column && column[3]) params.order = `${column[3]}:${dir}`;
  // A filter the API refuses (a bad duration, a score condition) is shown above the
  // form, which stays to be corrected.
  let result;
  let failure = null;
  try {
    result = await api('/api/v1/traces', params);
  } catch (e) {
    if (e.status !== 400) throw e;
    failure = e;
    result = { traces: [] };
  }
  const rows = result.traces;

  // Filters: a form whose submit writes the URL.
  const inputs = {};
  const field = ([key, label, cls, placeholder]) => {
    inputs[key] = h('input', { name: key, value: p[key] || '', class: cls || null, placeholder: placeholder || null, list: `dl-${key}` });
    return h('label', {}, label, inputs[key]);
  };
  const kind = h('select', { name: 'llm_kind' }, KINDS.map((k) => h('option', { value: k, selected: (p.llm_kind || '') === k }, k || 'any')));
  const status = h('select', { name: 'status' }, ['', 'error', 'ok'].map((s) => h('option', { value: s, selected: (p.status || '') === s }, s || 'any')));
  const services = [...new Set(result.traces.map((t) => t.root_service))].sort();
  const form = h(
    'form',
    {
      class: 'filters',
      id: 'trace-filters',
      onsubmit: (e) => {
        e.preventDefault();
        const changes = { llm_kind: kind.value, status: status.value };
        for (const [k, el] of Object.entries(inputs)) changes[k] = el.value.trim();
        go('traces', p, changes);
      },
    },
    FILTERS.slice(0, 7).map(field),
    h('label', {}, 'span kind', kind),
    h('label', {}, 'status', status),
    FILTERS.slice(7).map(field),
    h('datalist', { id: 'dl-service' }, services.map((s) => h('option', { value: s }))),
    h('button', { type: 'submit', class: 'primary' }, 'Search'),
    h('button', { type: 'button', onclick: () => navigate('traces', { since: p.since }) }, 'Clear'),
  );

  // Two picked rows can be compared.
  const picked = new Set((p.pick || '').split(',').filter(Boolean));
  const compareBtn = h('button', { type: 'button', id: 'compare-picked', disabled: picked.size !== 2 }, 'Compare picked');
  compareBtn.addEventListener('click', () => {
    const [a, b] = [...picked];
    navigate('compare', { a, b });
  });
  const pickBox = (t) => h('input', {
    type: 'checkbox',
    'aria-label': `pick ${t.trace_id} to compare`,
    checked: picked.has(t.trace_id),
    onchange: (e) => {
      if (e.target.checked) picked.add(t.trace_id);
      else picked.delete(t.trace_id);
      while (picked.size > 2) picked.delete(picked.values().next().value);
      compareBtn.disabled = picked.size !== 2;
      // Kept in the address (without re-rendering), so sorting or going back keeps them.
      history.replaceState(null, '', link('traces', { ...p, pick: [...picked].join(',') }));
      for (const box of table.querySelectorAll('input[type=checkbox]')) {
        box.checked = picked.has(box.closest('tr').dataset.trace);
      }
    },
  });

  const header = h('tr', {}, h('th', {}, ''), COLUMNS.map(([key, label, num, order]) => h('th', {
    class: [order !== undefined ? 'sortable' : '', num ? 'num' : '', sort === key ? `sorted ${dir}` : ''].join(' ').trim(),
    onclick: order === undefined ? null : () => go('traces', p, { sort: key, dir: sort === key && dir === 'desc' ? 'asc' : 'desc' }),
  }, label)), h('th', {}, 'user'), h('th', {}, ''));
  const table = h(
    'table',
    { class: 'list', id: 'trace-list' },
    h('thead', {}, header),
    h('tbody', {}, rows.map((t) => h(
      'tr',
      { class: t.error ? 'err' : null, 'data-trace': t.trace_id },
      h('td', {}, pickBox(t)),
      h('td', { title: fmtTime(t.start_ns) }, fmtAgo(t.start_ns)),
      h('td', { class: 'name' },
        h('a', { href: traceLink(t.trace_id) }, t.root_name || t.trace_id),
        ' ', h('span', { class: 'muted' }, t.root_service)),
      h('td', { class: 'num' }, fmtMs(t.duration_ms)),
      h('td', { class: 'num' }, fmtInt(t.span_count)),
      h('td', { class: 'num', title: `${fmtInt(t.input_tokens)} in, ${fmtInt(t.output_tokens)} out` }, fmtInt(t.total_tokens)),
      h('td', { class: 'num' }, fmtCost(t.cost_usd)),
      // The user narrows the list to their traces; the session is in the tooltip.
      h('td', { class: 'user', title: t.session_id ? `session ${t.session_id}` : null },
        t.user_id ? h('a', { href: link('traces', { ...p, user_id: t.user_id, pick: '' }) }, t.user_id) : ''),
      h('td', {}, t.error ? errorMark() : ''),
    ))),
  );

  const total = rows.reduce((acc, t) => acc + (t.cost_usd || 0), 0);
  mount(
    root,
    h('div', { class: 'toolbar' },
      h('h1', { style: { margin: '0 12px 0 0' } }, 'Traces'),
      rangePicker(p.since, (r) => go('traces', p, { since: r, start: '', end: '' })),
      h('span', { class: 'muted', id: 'trace-count' },
        `${rows.length}${rows.length >= Number(p.limit) ? '+' : ''} traces, ${fmtCost(total)}`),
      rows.length >= Number(p.limit)
        ? h('button', { type: 'button', onclick: () => go('traces', p, { limit: String(Math.min(1000, Number(p.limit) * 5)) }) }, 'more')
        : null,
      h('span', { style: { flex: '1' } }),
      compareBtn),
    form,
    failure ? errorBox(failure) : null,
    rows.length || failure ? table : h('div', { class: 'empty' }, 'No trace matches these filters in this time range.'),
  );
}
