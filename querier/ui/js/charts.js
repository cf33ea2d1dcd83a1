// Small SVG charts for the dashboard, with no library: a time-series line chart and a
// horizontal bar chart. Each chart measures its own width (ResizeObserver) and draws
// its SVG at that size, so text and dots keep their shape at any width; values show
// in native <title> tooltips. (The axis formatters, fmtShort and fmtDurShort, are in
// core.js with the other formatters.)

import { h, pad2, svg } from './core.js';

/** Eight distinguishable colours; series take them in order. */
export const PALETTE = ['#3b5bdb', '#e8590c', '#2b8a3e', '#ae3ec9', '#1098ad', '#f59f00', '#d6336c', '#5c677d'];

/** The colour of the i-th series. */
export const colour = (i) => PALETTE[i % PALETTE.length];

const HEIGHT = 180;
const PAD = { top: 10, right: 14, bottom: 22 };
const DAY_MS = 86400e3;

// --- Scales and ticks ------------------------------------------------------------

/** Round ticks from `min` to at least `max`: about `count` intervals. */
function niceTicks(min, max, count = 3) {
  if (!(max > min)) max = min + (min === 0 ? 1 : Math.abs(min));
  const rough = (max - min) / count;
  const mag = 10 ** Math.floor(Math.log10(rough));
  const norm = rough / mag;
  const step = (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 2.5 ? 2.5 : norm <= 5 ? 5 : 10) * mag;
  const lo = Math.floor(min / step) * step;
  const ticks = [];
  for (let v = lo; v < max + step * 0.999; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

/** Time-tick intervals (ms) within a day, and in days. */
const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720].map((m) => m * 60e3);
const DAY_STEPS = [1, 2, 5, 7, 14].map((d) => d * DAY_MS);

/** Tick times (ms) on local-time boundaries between t0 and t1 (ms), at most `max`. */
function timeTicks(t0, t1, max) {
  const daily = t1 - t0 >= 2 * DAY_MS;
  const steps = daily ? DAY_STEPS : TIME_STEPS.concat(DAY_STEPS);
  const step = steps.find((s) => (t1 - t0) / s <= max) || steps[steps.length - 1];
  // Align on local time: shift by the zone's offset (ignoring DST inside the range).
  const off = new Date(t0).getTimezoneOffset() * 60e3;
  const ticks = [];
  for (let t = Math.ceil((t0 - off) / step) * step + off; t <= t1; t += step) ticks.push(t);
  return { ticks, daily };
}

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

/** "14:30" or, for ranges of days, "Nov 22". */
function timeLabel(ms, daily) {
  const d = new Date(ms);
  return daily ? `${MONTHS[d.getMonth()]} ${d.getDate()}` : `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
}

/** "Nov 22 14:30" for tooltips. */
export function fmtStamp(ns) {
  const d = new Date(ns / 1e6);
  return `${MONTHS[d.getMonth()]} ${d.getDate()} ${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
}

// --- Chart frame -------------------------------------------------------------------

/**
 * The element every chart returns: title, an optional note, the SVG (drawn by
 * `draw(width)` whenever the width changes) and the legend.
 */
function frame({ id, title, note, empty, draw, legend }) {
  const root = h('div', { class: 'chart', 'data-chart': id || null },
    h('div', { class: 'chart-head' }, h('h3', {}, title), note ? h('span', { class: 'chart-note muted' }, note) : null));
  if (empty) {
    root.classList.add('is-empty');
    root.append(h('div', { class: 'chart-empty' }, 'No data in this range.'));
    return root;
  }
  const plot = svg('svg', { role: 'img', 'aria-label': title, preserveAspectRatio: 'none' });
  root.append(plot);
  if (legend) root.append(legend);
  let width = 0;
  let seen = false;
  const redraw = (w) => {
    width = Math.max(200, Math.round(w));
    draw(plot, width);
  };
  redraw(600); // a first drawing before the chart is in the page
  const ro = new ResizeObserver(() => {
    if (!root.isConnected) {
      if (seen) ro.disconnect(); // the page moved on
      return;
    }
    seen = true;
    const w = plot.getBoundingClientRect().width;
    if (w && Math.round(w) !== width) redraw(w);
  });
  ro.observe(root);
  root.redraw = () => redraw(width); // for legend toggles
  return root;
}

/** A <title> child: the native tooltip. */
const tip = (text) => svg('title', {}, text);

/** The left margin fitting the y labels (10px axis text is about 6px a character). */
function leftPad(labels) {
  return Math.min(96, Math.max(36, Math.max(...labels.map((l) => l.length)) * 6 + 12));
}

/** Horizontal gridlines with their labels, for a y scale. */
function yGrid(g, ticks, labels, y, left, width) {
  ticks.forEach((v, i) => {
    const py = y(v);
    g.append(
      svg('line', { class: 'grid', x1: left, x2: width - PAD.right, y1: py, y2: py }),
      svg('text', { class: 'axis', x: left - 6, y: py + 3, 'text-anchor': 'end' }, labels[i]),
    );
  });
}

// --- Line chart ----------------------------------------------------------------------

/**
 * A time-series line chart.
 *
 * series: [{name, points: [{t (Unix ns), v (null for a gap), dot?, label?, …}], colour?}]
 * (dot: false draws no dot, for a filled-in bucket; label: a tooltip line);
 * domain: [t0, t1] in Unix ns (default: the points' extent); format: a value's text
 * for tooltips, axisFormat for the y labels (default: format); onPointClick(series,
 * point) makes the dots clickable; note: a muted line beside the title.
 */
export function lineChart({ title, series, format = String, axisFormat, onPointClick, id, domain, note }) {
  const all = (series || []).map((s, i) => ({ ...s, colour: s.colour || colour(i) }));
  // Filled-in buckets (dot: false) alone are no data.
  const hasData = all.some((s) => s.points.some((p) => p.v !== null && p.v !== undefined && p.dot !== false));
  const hidden = new Set();
  let root;

  const legend = all.length > 1 || (all[0] && all[0].name)
    ? h('div', { class: 'legend' }, all.map((s) => {
      const toggle = (e) => {
        if (hidden.has(s.name)) hidden.delete(s.name);
        else if (hidden.size < all.length - 1) hidden.add(s.name); // keep one shown
        e.currentTarget.classList.toggle('off', hidden.has(s.name));
        root.redraw();
      };
      return h('span', {
        class: 'legend-item',
        title: 'show or hide',
        role: 'button',
        tabindex: '0',
        onclick: toggle,
        onkeydown: (e) => {
          if (e.key === 'Enter' || e.key === ' ') {
            e.preventDefault();
            toggle(e);
          }
        },
      }, h('i', { style: { background: s.colour } }), s.name);
    }))
    : null;

  const draw = (plot, width) => {
    const shown = all.filter((s) => !hidden.has(s.name));
    const pts = shown.flatMap((s) => s.points).filter((p) => p.v !== null && p.v !== undefined);
    const ts = all.flatMap((s) => s.points.map((p) => p.t));
    const [t0, t1] = domain || [Math.min(...ts), Math.max(...ts)];
    const vs = pts.map((p) => p.v);
    const ticks = niceTicks(Math.min(0, ...vs), Math.max(0, ...vs));
    const [lo, hi] = [ticks[0], ticks[ticks.length - 1]];
    const labels = ticks.map(axisFormat || format);
    const left = leftPad(labels);
    const innerW = width - left - PAD.right;
    const innerH = HEIGHT - PAD.top - PAD.bottom;
    const x = (t) => left + (t1 > t0 ? ((t - t0) / (t1 - t0)) * innerW : innerW / 2);
    const y = (v) => PAD.top + innerH - ((v - lo) / (hi - lo)) * innerH;

    plot.setAttribute('viewBox', `0 0 ${width} ${HEIGHT}`);
    const g = svg('g');
    yGrid(g, ticks, labels, y, left, width);

    // Time axis.
    const { ticks: tt, daily } = timeTicks(t0 / 1e6, t1 / 1e6, Math.max(2, Math.floor(innerW / 70)));
    g.append(svg('line', { class: 'baseline', x1: left, x2: width - PAD.right, y1: y(lo), y2: y(lo) }));
    for (const ms of tt) {
      g.append(svg('text', { class: 'axis', x: x(ms * 1e6), y: HEIGHT - 6, 'text-anchor': 'middle' }, timeLabel(ms, daily)));
    }

    // Lines (broken at gaps), then dots on top.
    for (const s of shown) {
      let d = '';
      let pen = false;
      for (const p of s.points) {
        if (p.v === null || p.v === undefined) {
          pen = false;
          continue;
        }
        d += `${pen ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`;
        pen = true;
      }
      if (d) g.append(svg('path', { class: 'line', d, stroke: s.colour }));
    }
    const dense = pts.length > 240;
    for (const s of shown) {
      for (const p of s.points) {
        if (p.v === null || p.v === undefined || p.dot === false) continue;
        const dot = svg('circle', {
          class: `pt${onPointClick ? ' clickable' : ''}`,
          cx: x(p.t).toFixed(1),
          cy: y(p.v).toFixed(1),
          r: dense ? 1.8 : 2.6,
          fill: s.colour,
        }, tip(`${s.name ? `${s.name}: ` : ''}${format(p.v)}\n${fmtStamp(p.t)}${p.label ? `\n${p.label}` : ''}`));
        if (onPointClick) dot.addEventListener('click', () => onPointClick(s, p));
        g.append(dot);
      }
    }
    plot.replaceChildren(g);
  };

  root = frame({ id, title, note, empty: !hasData, draw, legend });
  return root;
}

// --- Bar chart -------------------------------------------------------------------------

const BAR_ROW = 24;
/** Approximate width of a label character at 12px, for the label column. */
const CHAR_W = 6.8;
const MAX_LABEL = 30;

/**
 * A horizontal bar chart, largest first as given: bars: [{label, value, href?}].
 * Bars with an href are links.
 */
export function barChart({ title, bars, format = String, axisFormat, id, note }) {
  const list = (bars || []).filter((b) => Number.isFinite(b.value));
  const empty = !list.length || list.every((b) => b.value === 0);
  const height = PAD.top + list.length * BAR_ROW + PAD.bottom;

  const draw = (plot, width) => {
    plot.setAttribute('viewBox', `0 0 ${width} ${height}`);
    plot.style.height = `${height}px`;
    const max = Math.max(0, ...list.map((b) => b.value));
    const ticks = niceTicks(0, max);
    const top = ticks[ticks.length - 1];
    const longest = Math.max(4, ...list.map((b) => Math.min(b.label.length, MAX_LABEL)));
    const x0 = Math.min(width * 0.45, longest * CHAR_W + 14);
    const innerW = width - x0 - PAD.right - 64; // room for the value after the bar
    const x = (v) => x0 + (v / top) * innerW;
    const g = svg('g');
    for (const v of ticks) {
      g.append(
        svg('line', { class: 'grid', x1: x(v), x2: x(v), y1: PAD.top - 4, y2: height - PAD.bottom }),
        svg('text', { class: 'axis', x: x(v), y: height - 6, 'text-anchor': 'middle' }, (axisFormat || format)(v)),
      );
    }
    list.forEach((b, i) => {
      const y = PAD.top + i * BAR_ROW;
      const short = b.label.length > MAX_LABEL ? `${b.label.slice(0, MAX_LABEL - 1)}…` : b.label;
      const row = svg('g', { class: 'bar-row' },
        tip(`${b.label}: ${format(b.value)}`),
        svg('text', { class: 'bar-label', x: x0 - 8, y: y + BAR_ROW / 2 + 4, 'text-anchor': 'end' }, short),
        svg('rect', {
          class: 'bar',
          x: x0,
          y: y + 4,
          width: Math.max(1, x(b.value) - x0),
          height: BAR_ROW - 8,
          rx: 2,
          fill: colour(i),
        }),
        svg('text', { class: 'bar-value', x: x(b.value) + 6, y: y + BAR_ROW / 2 + 4 }, format(b.value)));
      g.append(b.href ? svg('a', { href: b.href, class: 'bar-link' }, row) : row);
    });
    plot.replaceChildren(g);
  };

  return frame({ id, title, note, empty, draw });
}
