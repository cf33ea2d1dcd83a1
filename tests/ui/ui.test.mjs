// The web UI in headless Chromium, as a user goes through it: the trace list and its
// URL filters, a trace's tree and timeline, an LLM span's messages, a score added from
// the page, a 5,000-span trace (only the visible rows exist), compare, sessions, the
// dashboard's charts, and the key login of a deployment with keys.
//
// Run by tests/integration/ui.rs, which starts the servers and sets:
//   LOUPE_UI_URL         a standalone with demo data, served without keys
//   LOUPE_UI_INGEST_URL  its OTLP/HTTP base URL
//   LOUPE_UI_KEYED_URL   a standalone whose config lists the prod project shop/chat
//   LOUPE_UI_QUERY_KEY   that project's query key
//   LOUPE_UI_ARTIFACTS   where screenshots go
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { launch } from './browser.mjs';

const base = process.env.LOUPE_UI_URL;
const ingest = process.env.LOUPE_UI_INGEST_URL;
const keyed = process.env.LOUPE_UI_KEYED_URL;
const queryKey = process.env.LOUPE_UI_QUERY_KEY;
const artifacts = process.env.LOUPE_UI_ARTIFACTS || '.';
assert.ok(base && ingest && keyed && queryKey, 'LOUPE_UI_* variables are set');

const browser = await launch();
const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
// The whole suite runs beside this test on two cores: waits are generous (they end as
// soon as the page is ready; only a failure waits them out).
context.setDefaultTimeout(60000);
const page = await context.newPage();
const problems = [];
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
page.on('console', (m) => {
  if (m.type() === 'error') problems.push(`console error: ${m.text()}`);
});
// Nothing but the server under test is ever asked for.
page.on('request', (r) => {
  const u = new URL(r.url());
  if (!r.url().startsWith('data:') && u.origin !== new URL(base).origin && u.origin !== new URL(keyed).origin) {
    problems.push(`request to another host: ${r.url()}`);
  }
});

let step = 0;
async function check(name, fn) {
  step += 1;
  const started = Date.now();
  try {
    await fn();
    console.log(`ok ${step} - ${name} (${Date.now() - started} ms)`);
  } catch (e) {
    await page.screenshot({ path: join(artifacts, `failed-${step}.png`) }).catch(() => {});
    console.log(`not ok ${step} - ${name}\n${e.stack || e}`);
    await browser.close();
    process.exit(1);
  }
  assert.deepEqual(problems, [], 'no console error, page error or outside request');
}
const shot = (name) => page.screenshot({ path: join(artifacts, `${name}.png`) });
const api = async (path) => {
  const r = await fetch(base + path);
  assert.equal(r.status, 200, `${path}: ${await r.clone().text()}`);
  return r.json();
};
/** Opens `url` and waits until the UI has rendered that route. */
async function visit(url, on = page) {
  const before = await on.evaluate(() => document.getElementById('main')?.dataset.rendered).catch(() => undefined);
  await on.goto(url);
  await on.waitForFunction((b) => {
    const m = document.getElementById('main');
    return m && m.dataset.rendered && m.dataset.rendered !== b && m.getAttribute('aria-busy') === 'false';
  }, before);
}
const hashParams = () => new URLSearchParams(new URL(page.url()).hash.split('?')[1] || '');

const demo = (await api('/api/v1/traces?since=24h&limit=1000')).traces;
const supportTraces = demo.filter((t) => t.root_name === 'support_agent');
assert.ok(supportTraces.length >= 2, 'the demo has support_agent traces');

await check('the trace list shows the demo traces with their totals', async () => {
  await page.goto(`${base}/`);
  await page.waitForSelector('#trace-list tbody tr');
  assert.match(page.url(), /#\/traces|\/$/);
  const rows = await page.locator('#trace-list tbody tr').count();
  assert.ok(rows >= 20, `${rows} rows`);
  // The newest trace is first, with its duration, span count and cost.
  const first = page.locator('#trace-list tbody tr').first();
  assert.equal(await first.getAttribute('data-trace'), demo[0].trace_id);
  const count = demo[0].span_count.toLocaleString('en-US');
  const cells = await first.locator('td').allInnerTexts(); // pick, started, trace, duration, spans, …
  assert.equal(cells[4].trim(), count, `span count of ${cells.join(' | ')}`);
  await shot('traces');
  // A row's user narrows the list to that user's traces.
  const userLink = page.locator('#trace-list tbody td.user a').first();
  const user = await userLink.innerText();
  const before = await page.evaluate(() => document.getElementById('main').dataset.rendered);
  await userLink.click();
  await page.waitForFunction((b) => document.getElementById('main').dataset.rendered !== b
    && document.getElementById('main').getAttribute('aria-busy') === 'false', before);
  assert.equal(hashParams().get('user_id'), user);
  const users = await page.locator('#trace-list tbody td.user').allInnerTexts();
  assert.ok(users.length > 0 && users.every((u) => u === user), users.join(','));
});

await check('filters live in the URL and narrow the list', async () => {
  await visit(`${base}/#/traces?since=24h`);
  await page.fill('#trace-filters input[name=service]', 'docs-search');
  await page.click('#trace-filters button[type=submit]');
  await page.waitForFunction(() => location.hash.includes('service=docs-search'));
  await page.waitForSelector('#trace-list tbody tr');
  const want = demo.filter((t) => t.root_service === 'docs-search').length;
  const texts = await page.locator('#trace-list tbody tr').allInnerTexts();
  assert.ok(texts.length > 0 && texts.every((t) => t.includes('docs-search')), texts.join('\n'));
  assert.ok(texts.length <= want, `${texts.length} rows, ${want} docs-search traces`);
  // A filter the API refuses says why, and the form stays to correct it.
  await visit(`${base}/#/traces?since=24h&min_duration=fast`);
  assert.match(await page.innerText('.error-box'), /min_duration/);
  assert.equal(await page.inputValue('#trace-filters input[name=min_duration]'), 'fast');
  problems.length = 0; // the browser logs the 400 answer itself
  await visit(`${base}/#/traces?since=24h&service=docs-search`);
  // The link reproduces the view, in another tab.
  const tab = await context.newPage();
  await visit(page.url(), tab);
  assert.equal(await tab.inputValue('#trace-filters input[name=service]'), 'docs-search');
  assert.equal(await tab.locator('#trace-list tbody tr').count(), texts.length);
  await tab.close();
  // Sorting by cost puts the most expensive first.
  await visit(`${base}/#/traces?since=24h&sort=cost_usd&dir=desc`);
  const top = await page.locator('#trace-list tbody tr').first().getAttribute('data-trace');
  const max = demo.reduce((a, b) => (b.cost_usd > a.cost_usd ? b : a));
  assert.equal(top, max.trace_id);
});

const chosen = supportTraces[0];
const trace = await api(`/api/v1/traces/${chosen.trace_id}`);
const spans = [];
const walk = (s) => { spans.push(s); s.children.forEach(walk); };
trace.roots.forEach(walk);

await check('a trace opens as a tree beside its timeline, collapsible', async () => {
  await visit(`${base}/#/traces?since=24h&name=support_agent`);
  await page.click(`#trace-list tr[data-trace="${chosen.trace_id}"] a`);
  await page.waitForSelector('#waterfall .wf-row');
  assert.equal(await page.locator('#waterfall .wf-row').count(), spans.length);
  assert.match(await page.innerText('#trace-totals'), new RegExp(String(spans.length)));
  await page.click('#collapse-all');
  await page.waitForFunction(() => document.querySelectorAll('#waterfall .wf-row').length === 1);
  await page.click('#expand-all');
  await page.waitForFunction((n) => document.querySelectorAll('#waterfall .wf-row').length === n, spans.length);
  // The root's toggle folds its subtree.
  await page.locator('#waterfall .wf-row').first().locator('.wf-toggle').click();
  await page.waitForFunction(() => document.querySelectorAll('#waterfall .wf-row').length === 1);
  await page.locator('#waterfall .wf-row').first().locator('.wf-toggle').click();
  await page.waitForFunction((n) => document.querySelectorAll('#waterfall .wf-row').length === n, spans.length);
});

await check('an LLM span shows its messages as a chat', async () => {
  const llm = spans.find((s) => s.llm_kind === 'LLM' && s.input && s.input.startsWith('['));
  assert.ok(llm, 'the trace has an LLM span with messages');
  await page.click(`#waterfall .wf-row[data-span="${llm.span_id}"]`);
  await page.waitForSelector('#span-detail .msg-user');
  const messages = JSON.parse(llm.input);
  const user = messages.find((m) => m.role === 'user');
  assert.match(await page.innerText('#span-detail .msg-user'), new RegExp(user.content.slice(0, 40).replace(/[.*+?^${}()|[\]\\]/g, '\\$&')));
  // Every message of the call, input and output, with its role.
  const all = [...messages, ...(JSON.parse(llm.output || '[]') || [])];
  for (const role of new Set(all.map((m) => m.role))) {
    const want = all.filter((m) => m.role === role).length;
    const got = await page.locator(`#span-detail .msg-${role}`).count();
    assert.equal(got, want, `${role} messages`);
  }
  assert.equal(hashParams().get('span'), llm.span_id, 'the span is in the URL');
  await shot('trace');
});

await check('a retrieval span shows its ranked documents', async () => {
  const rag = demo.find((t) => t.root_name === 'query');
  const full = await api(`/api/v1/traces/${rag.trace_id}`);
  const all = [];
  const w = (s) => { all.push(s); s.children.forEach(w); };
  full.roots.forEach(w);
  const retriever = all.find((s) => s.llm_kind === 'RETRIEVER');
  await visit(`${base}/#/trace/${rag.trace_id}?span=${retriever.span_id}`);
  await page.waitForSelector('#span-detail .doc');
  const docs = JSON.parse(retriever.output).documents;
  assert.equal(await page.locator('#span-detail .doc').count(), docs.length);
  // Ranked as retrieved: the first shows the first document's title and score.
  const first = await page.locator('#span-detail .doc').first().innerText();
  assert.ok(first.includes(String(docs[0].score)), `${first} / score ${docs[0].score}`);
  assert.ok(first.includes(docs[0].metadata?.title || docs[0].id), first);
  await shot('retrieval');
  // Its embedding span: model, texts and dimensions.
  const embedding = all.find((s) => s.llm_kind === 'EMBEDDING');
  await page.click(`#waterfall .wf-row[data-span="${embedding.span_id}"]`);
  await page.waitForFunction(() => (document.getElementById('span-detail')?.innerText || '').includes('dimensions'));
  const detail = await page.innerText('#span-detail');
  assert.match(detail, /dimensions\s+1,536/);
  assert.ok(detail.includes(embedding.request_model || embedding.response_model), detail);
});

await check('a score added on the page is stored through the scores API', async () => {
  await visit(`${base}/#/trace/${chosen.trace_id}`);
  await page.waitForSelector('#score-form');
  await page.fill('#score-form input[name=name]', 'helpfulness');
  await page.fill('#score-form input[name=value]', '0.25');
  await page.fill('#score-form input[name=comment]', 'missed the refund policy');
  await page.check('#score-form input[name=whole-trace]');
  await page.click('#score-form button[type=submit]');
  await page.waitForFunction(
    () => (document.getElementById('trace-scores')?.innerText || '').includes('helpfulness'),
    null,
    { timeout: 60000 },
  );
  const stored = await api(`/api/v1/scores?trace_id=${chosen.trace_id}&since=1h`);
  const s = stored.scores.find((x) => x.name === 'helpfulness');
  assert.ok(s, JSON.stringify(stored));
  assert.equal(s.value, 0.25);
  assert.equal(s.source, 'human');
  assert.equal(s.comment, 'missed the refund policy');
  assert.equal(s.span_id, undefined, 'a score of the whole trace');
});

await check('a 5,000-span trace renders only the rows in view and scrolls to its end', async () => {
  const id = await sendBigTrace(5000);
  const t = await waitFor(async () => {
    const r = await fetch(`${base}/api/v1/traces/${id}`);
    if (r.status !== 200) return null;
    const j = await r.json();
    return j.span_count === 5000 ? j : null;
  });
  await visit(`${base}/#/trace/${id}`);
  await page.waitForSelector('#waterfall .wf-row');
  await page.click('#expand-all');
  const inDom = await page.locator('#waterfall .wf-row').count();
  assert.ok(inDom < 200, `${inDom} rows in the DOM for 5,000 spans`);
  // Scrolled to the end, the last span's row is there.
  await page.locator('#waterfall').evaluate((el) => { el.scrollTop = el.scrollHeight; });
  const lastSpan = lastSpanOf(t);
  await page.waitForSelector(`#waterfall .wf-row[data-span="${lastSpan}"]`);
  assert.ok(await page.locator('#waterfall .wf-row').count() < 200);
  await shot('big-trace');
});

await check('two traces picked in the list are compared side by side', async () => {
  const [a, b] = supportTraces;
  await visit(`${base}/#/traces?since=24h&name=support_agent`);
  await page.check(`#trace-list tr[data-trace="${a.trace_id}"] input[type=checkbox]`);
  await page.check(`#trace-list tr[data-trace="${b.trace_id}"] input[type=checkbox]`);
  await page.click('#compare-picked');
  await page.waitForSelector('#compare-pairs');
  const p = hashParams();
  assert.deepEqual(new Set([p.get('a'), p.get('b')]), new Set([a.trace_id, b.trace_id]));
  const cmp = await api(`/api/v1/compare?a=${p.get('a')}&b=${p.get('b')}`);
  assert.ok(await page.locator('#compare-pairs tbody tr').count() >= 1);
  assert.match(await page.innerText('#compare-a'), new RegExp(p.get('a').slice(0, 8)));
  assert.match(await page.innerText('#compare-b'), new RegExp(p.get('b').slice(0, 8)));
  // What the compare API reports as different is highlighted.
  if (JSON.stringify(cmp).includes('"delta"')) {
    assert.ok(await page.locator('#compare-pairs .diff').count() >= 1);
  }
  await shot('compare');
  // "Same root name, previous day": the demo has no day before, and the page says so
  // and offers to pick the traces by id.
  await visit(`${base}/#/compare?a=${a.trace_id}&prev=1`);
  await page.waitForSelector('#compare-picker');
  assert.equal(await page.inputValue('#compare-input-a'), a.trace_id);
});

await check('a session reads as its sequence of traces', async () => {
  await visit(`${base}/#/sessions?since=24h`);
  await page.waitForSelector('#sessions-list tbody tr');
  const sessions = await api('/api/v1/sessions?since=24h');
  const multi = sessions.sessions.find((s) => s.traces >= 2) || sessions.sessions[0];
  await visit(`${base}/#/session/${encodeURIComponent(multi.id)}?since=24h`);
  await page.waitForSelector('#session-turns .turn');
  assert.equal(await page.locator('#session-turns .turn').count(), multi.traces);
  // Each turn shows the question the trace was asked, once loaded.
  const firstTurn = page.locator('#session-turns .turn').first();
  const t = await api(`/api/v1/traces/${await firstTurn.getAttribute('data-trace')}`);
  await firstTurn.locator('.msg-user .msg-text').waitFor();
  const question = await firstTurn.locator('.msg-user .msg-text').innerText();
  assert.ok(question.length > 0 && t.roots[0].input.includes(question.replace(/…$/, '').slice(0, 20)),
    `${question} / ${t.roots[0].input}`);
  await page.waitForFunction(() => [...document.querySelectorAll('#session-turns .turn')].slice(0, 3)
    .every((c) => ![...c.querySelectorAll('.msg .muted')].some((m) => m.textContent === '…')));
  await shot('session');
});

await check('a slow page left for another never draws over it', async () => {
  // The search answers late; meanwhile the user opens the sessions.
  let release;
  const held = new Promise((r) => { release = r; });
  await page.route(/\/api\/v1\/traces\?/, async (r) => { await held; await r.continue(); });
  await page.goto(`${base}/#/traces?since=24h&service=support-bot`);
  await visit(`${base}/#/sessions?since=24h`);
  release();
  await page.waitForTimeout(500);
  await page.unroute(/\/api\/v1\/traces\?/);
  assert.equal(await page.locator('#trace-list').count(), 0, 'the trace list drew over the sessions');
  assert.ok(await page.locator('#sessions-list').count() === 1);
});

await check('the dashboard draws its charts, linked to the traces behind them', async () => {
  await visit(`${base}/#/dashboard?since=3h`);
  for (const chart of ['requests', 'latency', 'tokens', 'cost', 'cost-by-group']) {
    await page.waitForSelector(`[data-chart="${chart}"] svg`);
    const marks = await page.locator(`[data-chart="${chart}"] svg path, [data-chart="${chart}"] svg rect, [data-chart="${chart}"] svg circle`).count();
    assert.ok(marks > 0, `${chart}: nothing drawn`);
  }
  await shot('dashboard');
  // A bar of cost by group leads to that group's traces.
  const bar = page.locator('[data-chart="cost-by-group"] a').first();
  const before = await page.evaluate(() => document.getElementById('main').dataset.rendered);
  await bar.click();
  await page.waitForFunction((b) => document.getElementById('main').dataset.rendered !== b
    && document.getElementById('main').getAttribute('aria-busy') === 'false', before);
  assert.match(page.url(), /#\/traces\?.*model=/);
  const model = hashParams().get('model');
  const rows = await page.locator('#trace-list tbody tr').count();
  assert.ok(rows > 0, `no trace behind the ${model} bar`);
});

await check('a deployment with keys asks for a query key and marks the environment', async () => {
  const fresh = await browser.newContext({ viewport: { width: 1440, height: 900 } });
  fresh.setDefaultTimeout(60000);
  const p = await fresh.newPage();
  p.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  p.on('request', (r) => {
    if (new URL(r.url()).origin !== new URL(keyed).origin) problems.push(`request to another host: ${r.url()}`);
  });
  // A shared link opens the login first, then the linked view.
  await p.goto(`${keyed}/#/traces?since=3h&status=error`);
  await p.waitForSelector('#query-key');
  await p.fill('#query-key', 'loupe_qk_not-a-key');
  await p.click('form.login button[type=submit]');
  await p.waitForSelector('.error-box');
  assert.match(await p.innerText('.error-box'), /not known/);
  await p.fill('#query-key', queryKey);
  await p.click('form.login button[type=submit]');
  await p.waitForSelector('#project .env-prod');
  assert.match(await p.inputValue('#project-picker'), /shop\/chat/);
  await p.waitForFunction(() => location.hash === '#/traces?since=3h&status=error');
  assert.equal(await p.inputValue('#trace-filters select[name=status]'), 'error');
  await p.waitForSelector('.empty, #trace-list');
  await p.screenshot({ path: join(artifacts, 'login-prod.png') });
  await fresh.close();
});

await browser.close();
console.log(`all ${step} checks passed`);

// --- helpers -----------------------------------------------------------------

async function waitFor(fn, timeoutMs = 60000) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** The id of the last span of the tree, depth-first (the last row when expanded). */
function lastSpanOf(t) {
  let s = t.roots[t.roots.length - 1];
  while (s.children.length) s = s.children[s.children.length - 1];
  return s.span_id;
}

/** Sends an agent trace of `n` spans over OTLP/HTTP JSON: 50 iterations, each with
 * an LLM call and tool calls under it. Returns its id. */
async function sendBigTrace(n) {
  const traceId = randomBytes(16).toString('hex');
  const now = BigInt(Date.now()) * 1000000n;
  const start = now - 60n * 1000000000n;
  const span = (id, parent, name, offsetMs, durMs, attrs = []) => ({
    traceId,
    spanId: id,
    parentSpanId: parent || undefined,
    name,
    kind: 1,
    startTimeUnixNano: String(start + BigInt(offsetMs) * 1000000n),
    endTimeUnixNano: String(start + BigInt(offsetMs + durMs) * 1000000n),
    attributes: attrs.map(([k, v]) => ({ key: k, value: { stringValue: v } })),
  });
  const sid = (i) => i.toString(16).padStart(16, '0');
  const all = [span(sid(1), null, 'agent run', 0, 50000, [['gen_ai.operation.name', 'invoke_agent']])];
  const iterations = 50;
  const per = (n - 1) / iterations - 1;
  let next = 2;
  for (let i = 0; i < iterations && next <= n; i++) {
    const it = sid(next++);
    all.push(span(it, sid(1), `iteration ${i + 1}`, i * 1000, 950));
    for (let j = 0; j < per && next <= n; j++) {
      const llm = j % 2 === 0;
      all.push(span(sid(next++), it, llm ? 'chat gpt-4o-mini' : `execute_tool lookup_${j}`, i * 1000 + j * 9, 8, llm
        ? [['gen_ai.operation.name', 'chat'], ['gen_ai.request.model', 'gpt-4o-mini']]
        : [['gen_ai.operation.name', 'execute_tool'], ['gen_ai.tool.name', `lookup_${j}`]]));
    }
  }
  while (next <= n) all.push(span(sid(next++), sid(1), 'tail', 49000, 10));
  for (let i = 0; i < all.length; i += 1000) {
    const body = {
      resourceSpans: [{
        resource: { attributes: [{ key: 'service.name', value: { stringValue: 'big-agent' } }] },
        scopeSpans: [{ scope: { name: 'ui-test' }, spans: all.slice(i, i + 1000) }],
      }],
    };
    const r = await fetch(`${ingest}/v1/traces`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    assert.equal(r.status, 200, await r.text());
  }
  return traceId;
}
