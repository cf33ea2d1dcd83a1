// The dashboard: totals of a time range, then charts of requests, errors, latency,
// tokens, cost by a chosen group and score averages (GET /api/v1/metrics and
// /api/v1/scores/metrics). Every point and bar links to the traces behind it: the
// trace list with the bucket's time range and the group's filter.
//
// URL: #/dashboard?since=24h&group_by=model (or start=&end= in Unix seconds or RFC 3339).

import {
  api, apiRange, durationSeconds, errorBox, fmtCost, fmtDurShort, fmtInt, fmtMs, fmtPct, fmtRelative, fmtShort, go, h,
  isAuthError, link, loading, mount, navigate, rangeParams, rangePicker, totals,
} from './core.js';
import { barChart, lineChart } from './charts.js';

/**
 * The group-by choices: metrics dimension → the trace list's filter for one of its
 * values (null: the trace list has no such filter, so links carry the time only).
 */
const GROUPS = [
  ['model', 'model'],
  ['user', 'user_id'],
  ['feature', null],
  ['service', 'service'],
  ['prompt_version', 'prompt_version'],
  ['provider', null],
];

/** Bucket widths the dashboard picks from: the smallest giving at most 48 buckets. */
const STEPS = [
  ['10s', 10], ['30s', 30], ['1m', 60], ['2m', 120], ['5m', 300], ['10m', 600], ['15m', 900],
  ['30m', 1800], ['1h', 3600], ['2h', 7200], ['3h', 10800], ['4h', 14400], ['6h', 21600],
  ['12h', 43200], ['1d', 86400], ['7d', 604800],
];
const MAX_BUCKETS = 48;

/** Series drawn on the cost-by-group line chart (the rest are summed as "other"). */
const MAX_LINES = 7;
/** Bars on the cost-by-group bar chart. */
const MAX_BARS = 12;

export async function render(root, route) {
  const p = rangeParams(route.params, { since: '24h', group_by: 'model' });
  const groupBy = GROUPS.some(([g]) => g === p.group_by) ? p.group_by : 'model';

  // The range, for the step: `since`, or start/end (Unix seconds or RFC 3339).
  const range = apiRange(p);
  const seconds = p.start ? spanSeconds(p.start, p.end) : durationSeconds(p.since);
  const step = p.step || pickStep(seconds || 86400);

  const toolbar = h('div', { class: 'toolbar' },
    h('h1', { class: 'page-title' }, 'Dashboard'),
    rangePicker(p.start ? '' : p.since, (r) => go('dashboard', p, { since: r, start: '', end: '' })),
    h('label', { class: 'inline-label' }, 'group by ',
      h('select', {
        id: 'group-by',
        'aria-label': 'group by',
        onchange: (e) => go('dashboard', p, { group_by: e.target.value }),
      }, GROUPS.map(([g]) => h('option', { value: g, selected: g === groupBy }, g.replace('_', ' '))))),
    h('span', { class: 'muted' }, `${p.start ? 'custom range, ' : ''}buckets of ${step}`));
  mount(root, toolbar, loading('Loading metrics…'));

  // Four queries at once; a failing one only blanks its own charts.
  const whole = `${Math.max(1, Math.ceil(seconds || 86400))}s`; // one bucket: the range's p95
  const [traces, overall, grouped, scores] = await Promise.allSettled([
    api('/api/v1/metrics', { ...range, step, level: 'trace' }),
    api('/api/v1/metrics', { ...range, step: whole, level: 'trace' }),
    api('/api/v1/metrics', { ...range, step, group_by: groupBy }),
    api('/api/v1/scores/metrics', { ...range, step }),
  ]);
  if (traces.status === 'rejected' && grouped.status === 'rejected') {
    const e = traces.reason;
    if (isAuthError(e)) throw e; // the shell asks for a key
    mount(root, toolbar, errorBox(e));
    return;
  }

  const filterKey = GROUPS.find(([g]) => g === groupBy)[1];
  const charts = h('div', { class: 'charts dashboard-charts' });
  const parts = [];

  if (traces.status === 'fulfilled') {
    const res = traces.value;
    parts.push(rangeTotals(res, overall.status === 'fulfilled' ? overall.value : null));
    charts.append(...traceCharts(res));
  } else {
    parts.push(errorBox(traces.reason));
  }
  const [cost, byGroup] = grouped.status === 'fulfilled'
    ? costCharts(grouped.value, groupBy, filterKey)
    : [failed('cost', 'Cost by group', grouped.reason), failed('cost-by-group', 'Cost by group, total', grouped.reason)];
  charts.append(
    cost,
    scores.status === 'fulfilled' ? scoreChart(scores.value) : failed('scores', 'Score averages', scores.reason),
    byGroup,
  );

  mount(root, toolbar, ...parts, charts);
}

// --- Time buckets ------------------------------------------------------------------

/** The smallest step of STEPS giving at most MAX_BUCKETS buckets over `seconds`. */
function pickStep(seconds) {
  const found = STEPS.find(([, s]) => seconds / s <= MAX_BUCKETS);
  return found ? found[0] : `${Math.ceil(seconds / MAX_BUCKETS)}s`;
}

/** Seconds between two API times (Unix seconds or RFC 3339; end defaults to now). */
function spanSeconds(start, end) {
  const secs = (v) => (/^\d+(\.\d+)?$/.test(v) ? Number(v) : Date.parse(v) / 1000);
  const s = secs(start);
  const e = end ? secs(end) : Date.now() / 1000;
  return Number.isFinite(s) && Number.isFinite(e) && e > s ? e - s : null;
}

/**
 * Every bucket of a metrics answer with `value(point)` of its point: buckets without
 * a point get `fill` (0 for counts; null, a gap, for rates and latencies). Each
 * point keeps its bucket's end for links.
 */
function line(res, apiPoints, value, fill = null) {
  const stepNs = res.step_seconds * 1e9;
  const n = Math.max(1, Math.ceil((res.end_ns - res.start_ns) / stepNs - 1e-6));
  const byIndex = new Map();
  for (const pt of apiPoints) byIndex.set(Math.round((pt.time_ns - res.start_ns) / stepNs), pt);
  const out = [];
  for (let i = 0; i < n; i++) {
    const t = res.start_ns + i * stepNs;
    const pt = byIndex.get(i);
    const v = pt ? value(pt) : fill;
    out.push({ t, end: Math.min(t + stepNs, res.end_ns), v: v ?? null, dot: Boolean(pt), raw: pt });
  }
  return out;
}

/** The trace list for a point's bucket, with extra filters. */
function tracesOf(point, filters = {}) {
  navigate('traces', { start: Math.floor(point.t / 1e9), end: Math.ceil(point.end / 1e9), ...filters });
}

// --- Totals ------------------------------------------------------------------------

/** The range's totals: requests, errors, error rate, p95, tokens, cost. */
function rangeTotals(res, overall) {
  const s = res.series[0];
  const requests = s ? s.requests : 0;
  const errors = s ? s.errors : 0;
  const tokensIn = s ? s.input_tokens : 0;
  const tokensOut = s ? s.output_tokens : 0;
  const p95 = overall?.series[0]?.points[0]?.latency_ms?.p95 ?? null;
  const all = { start: Math.floor(res.start_ns / 1e9), end: Math.ceil(res.end_ns / 1e9) };
  const sampled = res.sampling && res.sampling.extrapolated;
  return h('div', { class: 'dash-totals' },
    totals([
      [fmtInt(requests), 'requests', { href: link('traces', all) }],
      [fmtInt(errors), 'errors', { href: link('traces', { ...all, status: 'error' }) }],
      [requests ? fmtPct(errors / requests) : '–', 'error rate'],
      [fmtMs(p95), 'p95 latency'],
      [fmtInt(tokensIn + tokensOut), 'tokens', { title: `${fmtInt(tokensIn)} in, ${fmtInt(tokensOut)} out` }],
      [fmtCost(s ? s.cost_usd : 0), 'cost'],
    ], { id: 'dashboard-totals' }),
    sampled ? h('div', { class: 'muted sampling-note' }, `Sampled: ${res.sampling.note}`) : null);
}

// --- Charts ------------------------------------------------------------------------

/** Requests, error rate, latency and tokens: trace level, over all traffic. */
function traceCharts(res) {
  const pts = res.series[0]?.points || [];
  const domain = [res.start_ns, res.end_ns];
  const requests = lineChart({
    id: 'requests',
    title: 'Requests',
    domain,
    format: fmtInt,
    axisFormat: fmtShort,
    series: [
      { name: 'requests', points: line(res, pts, (x) => x.requests, 0) },
      { name: 'errors', points: line(res, pts, (x) => x.errors, 0), colour: '#c92a2a' },
    ],
    onPointClick: (s, pt) => tracesOf(pt, s.name === 'errors' ? { status: 'error' } : {}),
  });
  const errors = lineChart({
    id: 'errors',
    title: 'Error rate',
    domain,
    format: fmtPct,
    axisFormat: (v) => `${Number((v * 100).toFixed(1))} %`,
    series: [{ name: 'error rate', points: line(res, pts, (x) => x.error_rate), colour: '#c92a2a' }],
    onPointClick: (s, pt) => tracesOf(pt, { status: 'error' }),
  });
  // A click on p95 or p99 lists the traces at least that slow.
  const latency = lineChart({
    id: 'latency',
    title: 'Latency',
    note: 'per request',
    domain,
    format: fmtMs,
    axisFormat: fmtDurShort,
    series: ['p50', 'p95', 'p99'].map((q) => ({
      name: q,
      points: line(res, pts, (x) => x.latency_ms?.[q]),
    })),
    onPointClick: (s, pt) => tracesOf(pt, s.name === 'p50' ? {} : { min_duration: `${Math.floor(pt.v)}ms` }),
  });
  const tokens = lineChart({
    id: 'tokens',
    title: 'Tokens',
    domain,
    format: fmtInt,
    axisFormat: fmtShort,
    series: [
      { name: 'input', points: line(res, pts, (x) => x.input_tokens, 0) },
      { name: 'output', points: line(res, pts, (x) => x.output_tokens, 0) },
    ],
    onPointClick: (s, pt) => tracesOf(pt),
  });
  return [requests, errors, latency, tokens];
}

/** Cost over time per group, and each group's total as bars. */
function costCharts(res, groupBy, filterKey) {
  const label = (s) => s.group[groupBy] ?? '(none)';
  const filterOf = (s) => (filterKey && s.group[groupBy] != null ? { [filterKey]: s.group[groupBy] } : {});
  const byCost = [...res.series].sort((a, b) => b.cost_usd - a.cost_usd);
  const note = `${res.level} level${res.groups_omitted ? `, ${res.groups_omitted} more groups left out` : ''}`;
  const domain = [res.start_ns, res.end_ns];

  // The top groups as lines, the rest summed as one "other" line.
  const top = byCost.length > MAX_LINES + 1 ? byCost.slice(0, MAX_LINES) : byCost;
  const rest = byCost.slice(top.length);
  const series = top.map((s) => ({
    name: label(s),
    filters: filterOf(s),
    points: line(res, s.points, (x) => x.cost_usd, 0),
  }));
  if (rest.length) {
    const summed = new Map();
    for (const s of rest) {
      for (const pt of s.points) {
        const acc = summed.get(pt.time_ns) || { time_ns: pt.time_ns, cost_usd: 0 };
        acc.cost_usd += pt.cost_usd;
        summed.set(pt.time_ns, acc);
      }
    }
    series.push({ name: `other (${rest.length})`, filters: {}, points: line(res, [...summed.values()], (x) => x.cost_usd, 0) });
  }
  const cost = lineChart({
    id: 'cost',
    title: `Cost by ${groupBy.replace('_', ' ')}`,
    note,
    domain,
    format: fmtCost,
    axisFormat: (v) => (v === 0 ? '$0' : `$${fmtShort(v)}`),
    series,
    onPointClick: (s, pt) => tracesOf(pt, s.filters),
  });

  // Totals as bars; each bar lists its group's traces over the whole range.
  const all = { start: Math.floor(res.start_ns / 1e9), end: Math.ceil(res.end_ns / 1e9) };
  const shown = byCost.slice(0, MAX_BARS);
  const bars = shown.map((s) => ({ label: label(s), value: s.cost_usd, href: link('traces', { ...all, ...filterOf(s) }) }));
  if (byCost.length > shown.length) {
    const others = byCost.slice(shown.length);
    bars.push({ label: `other (${others.length})`, value: others.reduce((a, s) => a + s.cost_usd, 0), href: link('traces', all) });
  }
  const byGroup = barChart({
    id: 'cost-by-group',
    title: `Cost by ${groupBy.replace('_', ' ')}, total`,
    note,
    format: fmtCost,
    axisFormat: (v) => (v === 0 ? '$0' : `$${fmtShort(v)}`),
    bars,
  });
  return [cost, byGroup];
}

/** Score averages per name over time (numeric means, share of true for booleans). */
function scoreChart(res) {
  const averaged = res.series.filter((s) => s.avg !== undefined && s.avg !== null);
  const categorical = res.series.filter((s) => !averaged.includes(s));
  const stepNs = res.step_seconds * 1e9;
  const start = Date.parse(res.start) * 1e6;
  const end = Date.parse(res.end) * 1e6;
  const fake = { step_seconds: res.step_seconds, start_ns: start, end_ns: end };
  const chart = lineChart({
    id: 'scores',
    title: 'Score averages',
    note: categorical.length
      ? `labels only: ${categorical.map((s) => `${s.name} (${fmtInt(s.count)})`).join(', ')}`
      : 'by time scored',
    domain: [start, end],
    format: (v) => (Math.abs(v) < 10 ? v.toFixed(3) : fmtShort(v)),
    axisFormat: fmtShort,
    series: averaged.map((s) => ({
      name: s.data_type === 'boolean' ? `${s.name} (share true)` : s.name,
      score: s,
      points: line(fake, s.points, (x) => x.avg).map((pt) => ({
        ...pt,
        label: pt.raw ? `${fmtInt(pt.raw.count)} scores${pt.raw.change != null ? `, ${fmtRelative(pt.raw.change)} on the bucket before` : ''}` : null,
      })),
    })),
    // The traces scored in the bucket's value range; scores come after their trace,
    // so the list reaches back a day before the bucket.
    onPointClick: (s, pt) => {
      const filters = {};
      if (s.score.data_type === 'numeric' && pt.raw?.min !== undefined) {
        filters.score = `${s.score.name}>=${pt.raw.min},${s.score.name}<=${pt.raw.max}`;
      } else if (s.score.data_type === 'boolean') {
        // The failures when there are some, else the successes.
        filters.score = `${s.score.name}=${pt.v < 1 ? 'false' : 'true'}`;
      }
      tracesOf({ t: pt.t - 86400e9, end: Math.min(pt.t + stepNs, end) }, filters);
    },
  });
  return chart;
}

/** A chart's place when its query failed. */
function failed(id, title, err) {
  return h('div', { class: 'chart', 'data-chart': id }, h('h3', {}, title), errorBox(err));
}
