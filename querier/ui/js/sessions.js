// Sessions: the list (GET /api/v1/sessions) and one session as a conversation
// (GET /api/v1/sessions/{id}): its traces oldest first, each a card with the user's
// input and the final output of its root span, fetched as the card nears the screen.
//
// URLs: #/sessions?since=7d&user_id=&order=recent and #/session/<id>?since=30d.

import {
  api, apiRange, errorBox, errorMark, fetchTrace, fmtAgo, fmtCost, fmtInt, fmtMs, fmtTime, go, h, limiter, link,
  messageText, mount, navigate, rangeParams, rangePicker, sessionLink, totals, traceLink, walkSpans,
} from './core.js';

const ORDERS = ['recent', 'cost', 'traces', 'tokens'];
/** Trace details fetched at once on a session's page. */
const CONCURRENT = 4;
/** Characters of a message shown before "show all". */
const CLIP = 1200;

export async function render(root, route) {
  if (route.path[0] === 'session' && route.path[1]) return renderSession(root, route.path[1], route.params);
  return renderList(root, route.params);
}

// --- The list ------------------------------------------------------------------

async function renderList(root, params) {
  const p = rangeParams(params, { since: '7d', limit: '100' });
  const [res, users] = await Promise.all([
    api('/api/v1/sessions', { ...apiRange(p), user_id: p.user_id, order: p.order, limit: p.limit }),
    api('/api/v1/users', { ...apiRange(p), limit: 500 }).catch(() => null), // only for suggestions
  ]);
  const sessions = res.sessions;

  const user = h('input', { name: 'user_id', value: p.user_id || '', placeholder: 'any user', list: 'dl-session-users', id: 'sessions-user' });
  const order = h('select', { name: 'order', id: 'sessions-order' },
    ORDERS.map((o) => h('option', { value: o, selected: (p.order || 'recent') === o }, o === 'recent' ? 'most recent' : `most ${o}`)));
  const form = h('form', {
    class: 'filters',
    id: 'session-filters',
    onsubmit: (e) => {
      e.preventDefault();
      go('sessions', p, { user_id: user.value.trim(), order: order.value === 'recent' ? '' : order.value });
    },
  },
  h('label', {}, 'user', user),
  h('label', {}, 'order', order),
  h('datalist', { id: 'dl-session-users' }, (users?.users || []).map((u) => h('option', { value: u.id }))),
  h('button', { type: 'submit', class: 'primary' }, 'Search'),
  h('button', { type: 'button', onclick: () => navigate('sessions', p.start ? { start: p.start, end: p.end } : { since: p.since }) }, 'Clear'));

  const open = (s) => sessionLink(s.id, apiRange(p));
  const num = (v, title) => h('td', { class: 'num', title: title || null }, v);
  const table = h('table', { class: 'list', id: 'sessions-list' },
    h('thead', {}, h('tr', {},
      h('th', {}, 'session'), h('th', {}, 'user'), h('th', { class: 'num' }, 'traces'), h('th', { class: 'num' }, 'errors'),
      h('th', {}, 'first'), h('th', {}, 'last'), h('th', { class: 'num' }, 'length'),
      h('th', { class: 'num' }, 'tokens'), h('th', { class: 'num' }, 'cost'))),
    h('tbody', {}, sessions.map((s) => h('tr', {
      class: `clickable${s.errors ? ' err' : ''}`,
      'data-session': s.id,
      // A click anywhere on the row opens the session; links inside keep their own.
      onclick: (e) => {
        if (!e.target.closest('a')) location.hash = open(s);
      },
    },
    h('td', { class: 'name' }, h('a', { href: open(s) }, s.id)),
    h('td', {}, s.user_id
      ? h('a', { href: link('sessions', { ...apiRange(p), user_id: s.user_id }), title: 'this user\'s sessions' }, s.user_id)
      : h('span', { class: 'muted' }, '–')),
    num(fmtInt(s.traces)),
    h('td', { class: 'num' }, s.errors ? h('span', { class: 'err-mark' }, fmtInt(s.errors)) : h('span', { class: 'muted' }, '0')),
    h('td', { title: fmtTime(s.first_ns) }, fmtAgo(s.first_ns)),
    h('td', { title: fmtTime(s.last_ns) }, fmtAgo(s.last_ns)),
    num(fmtMs((s.last_ns - s.first_ns) / 1e6)),
    num(fmtInt(s.input_tokens + s.output_tokens), `${fmtInt(s.input_tokens)} in, ${fmtInt(s.output_tokens)} out`),
    num(fmtCost(s.cost_usd))))));

  const full = sessions.length >= Number(p.limit);
  const cost = sessions.reduce((a, s) => a + s.cost_usd, 0);
  mount(root,
    h('div', { class: 'toolbar' },
      h('h1', { class: 'page-title' }, 'Sessions'),
      rangePicker(p.start ? '' : p.since, (r) => go('sessions', p, { since: r, start: '', end: '' })),
      h('span', { class: 'muted', id: 'sessions-count' }, `${sessions.length}${full ? '+' : ''} sessions, ${fmtCost(cost)}`),
      full ? h('button', { type: 'button', onclick: () => go('sessions', p, { limit: String(Math.min(1000, Number(p.limit) * 5)) }) }, 'more') : null),
    form,
    sessions.length
      ? table
      : h('div', { class: 'empty' }, p.user_id
        ? `No session of user ${p.user_id} in this time range.`
        : 'No session in this time range. Traces join a session when a span carries a session id (session.id).'));
}

// --- One session ------------------------------------------------------------------

async function renderSession(root, id, params) {
  const p = rangeParams(params, { since: '30d' });
  const back = h('a', { href: link('sessions', p.start ? { start: p.start, end: p.end } : { since: p.since === '30d' ? '7d' : p.since }) }, '← sessions');
  const widen = rangePicker(p.start ? '' : p.since, (r) => { location.hash = sessionLink(id, { since: r }); });
  let res;
  try {
    res = await api(`/api/v1/sessions/${encodeURIComponent(id)}`, apiRange(p));
  } catch (e) {
    if (e.status !== 404) throw e;
    mount(root, h('div', { class: 'toolbar' }, back, h('h1', { class: 'page-title' }, 'Session'), h('code', {}, id)),
      errorBox(e), h('p', { class: 'muted' }, 'A wider time range may find it: '), widen);
    return;
  }
  const traces = res.traces;
  const sum = (k) => traces.reduce((a, t) => a + (t[k] || 0), 0);
  const errors = traces.filter((t) => t.error).length;
  const first = traces[0];
  const last = traces[traces.length - 1];
  const span = last.end_ns - first.start_ns;

  const list = h('div', { id: 'session-turns', class: 'turns' });
  const user = h('span', { class: 'muted', id: 'session-user' }, '');
  mount(root,
    h('div', { class: 'toolbar' },
      back,
      h('h1', { class: 'page-title' }, 'Session ', h('code', { class: 'session-id' }, id)),
      user,
      h('a', { href: link('traces', { ...apiRange(p), session_id: id }), id: 'session-traces' }, 'its traces in the list'),
      h('span', { class: 'spacer' }),
      widen),
    totals([
      [fmtInt(traces.length), 'traces'],
      [fmtInt(errors), 'errors', { mark: errors ? 'err-mark' : null }],
      [fmtMs(span / 1e6), `from ${fmtTime(first.start_ns)}`, { title: `${fmtTime(first.start_ns)} – ${fmtTime(last.end_ns)}` }],
      [fmtInt(sum('total_tokens')), 'tokens', { title: `${fmtInt(sum('input_tokens'))} in, ${fmtInt(sum('output_tokens'))} out` }],
      [fmtCost(sum('cost_usd')), 'cost'],
    ], { class: 'session-totals' }),
    traces.length >= 1000 ? h('p', { class: 'muted' }, 'The session\'s latest 1,000 traces.') : null,
    list);

  // The cards, each filled with its trace's input and output when it nears the screen.
  const run = limiter(CONCURRENT);
  const io = new IntersectionObserver((entries) => {
    // The page was left: stop watching its cards.
    if (!list.isConnected) {
      io.disconnect();
      return;
    }
    for (const e of entries) {
      if (!e.isIntersecting) continue;
      io.unobserve(e.target);
      e.target.load();
    }
  }, { rootMargin: '600px 0px' });
  let prev = null;
  traces.forEach((t, i) => {
    const card = turn(t, i, prev, run, (u) => {
      if (u && !user.textContent) user.textContent = `user ${u}`;
    });
    list.append(card);
    io.observe(card);
    prev = t;
  });
}

/** A trace of the session as a card; `card.load()` fetches its messages once. */
function turn(t, i, prev, run, onUser) {
  const chat = h('div', { class: 'chat turn-chat' },
    message('user', null, 'pending'), message('assistant', null, 'pending'));
  const gap = prev ? t.start_ns - prev.end_ns : null;
  const card = h('article', { class: `turn${t.error ? ' err' : ''}`, 'data-trace': t.trace_id },
    h('header', { class: 'turn-head' },
      h('span', { class: 'turn-n' }, `#${i + 1}`),
      h('span', { class: 'turn-time', title: fmtTime(t.start_ns) }, fmtTime(t.start_ns).slice(11)),
      gap !== null && gap > 0 ? h('span', { class: 'muted turn-gap', title: 'since the previous trace ended' }, `+${fmtMs(gap / 1e6)}`) : null,
      h('a', { href: traceLink(t.trace_id), class: 'turn-name' }, t.root_name || t.trace_id),
      h('span', { class: 'muted' }, t.root_service),
      h('span', { class: 'spacer' }),
      t.error ? errorMark() : null,
      h('span', { class: 'turn-stat', title: 'duration' }, fmtMs(t.duration_ms)),
      h('span', { class: 'turn-stat', title: `${fmtInt(t.input_tokens)} in, ${fmtInt(t.output_tokens)} out` }, `${fmtInt(t.total_tokens)} tok`),
      h('span', { class: 'turn-stat' }, fmtCost(t.cost_usd)),
      h('a', { href: traceLink(t.trace_id), class: 'turn-open' }, 'open trace →')),
    chat);
  let started = false;
  card.load = () => {
    if (started) return;
    started = true;
    run(async () => {
      if (!card.isConnected) return; // the page moved on
      try {
        const d = await fetchTrace(t.trace_id);
        const r = d.roots && d.roots[0];
        onUser(r?.user_id);
        const failed = walkSpans(d.roots, (s) => String(s.status).toUpperCase() === 'ERROR');
        mount(chat,
          message('user', r ? messageText(r.input, 'user') : null),
          message('assistant', r ? messageText(r.output, 'assistant') : null, null,
            failed ? `${failed.name} failed${failed.status_message ? `: ${failed.status_message}` : ''}` : null));
      } catch (e) {
        mount(chat, errorBox(e));
      }
    });
  };
  return card;
}

/** A chat bubble: the role, then the text (clipped when long) or a placeholder. */
function message(role, text, state, error) {
  let body;
  if (state === 'pending') body = h('div', { class: 'muted' }, '…');
  else if (text === null || text === undefined || text === '') body = h('div', { class: 'muted' }, role === 'user' ? 'no input recorded' : 'no output recorded');
  else body = clipped(text);
  return h('div', { class: `msg msg-${role}` },
    h('div', { class: 'role' }, role),
    body,
    error ? h('div', { class: 'err-mark turn-error' }, `✕ ${error}`) : null);
}

/** Long text cut at CLIP characters with a toggle. */
function clipped(text) {
  const body = h('div', { class: 'msg-text' }, text.length > CLIP ? `${text.slice(0, CLIP)}…` : text);
  if (text.length <= CLIP) return body;
  let open = false;
  const more = h('button', {
    type: 'button',
    class: 'link',
    onclick: () => {
      open = !open;
      body.textContent = open ? text : `${text.slice(0, CLIP)}…`;
      more.textContent = open ? 'show less' : `show all ${fmtInt(text.length)} characters`;
    },
  }, `show all ${fmtInt(text.length)} characters`);
  return h('div', {}, body, more);
}
