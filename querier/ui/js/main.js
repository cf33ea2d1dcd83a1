// The shell: the project picker in the header and the hash router that renders a
// page into <main>. Pages export `render(root, route)`.

import {
  api, currentProject, currentRoute, envBadge, errorBox, forgetProject, h, isAuthError, link, loading, mount,
  navigate, saveProject, savedProjects, selectProject,
} from './core.js';
import * as login from './login.js';
import * as traces from './traces.js';
import * as trace from './trace.js';
import * as compare from './compare.js';
import * as sessions from './sessions.js';
import * as dashboard from './dashboard.js';

const PAGES = {
  login,
  traces,
  trace,
  compare,
  sessions,
  session: sessions,
  dashboard,
};

let generation = 0;

/** Sends the user to the login page, remembering where they were and why. */
function toLogin(message) {
  const here = location.hash;
  if (message) sessionStorage.setItem('loupe.login-error', message);
  if (here && !here.startsWith('#/login')) sessionStorage.setItem('loupe.login-next', here);
  navigate('login');
}

async function route() {
  const my = ++generation;
  const r = currentRoute();
  const main = document.getElementById('main');
  let page = r.path[0] || 'traces';
  if (!PAGES[page]) page = 'traces';
  // Without a saved project, ask the server which project a keyless request reads
  // (a standalone without keys answers); otherwise ask for a key.
  if (page !== 'login' && !currentProject()) {
    try {
      const me = await api('/api/v1/whoami', null, { key: null });
      saveProject({ project: me.project, environment: me.environment, key: null, open: true });
    } catch (e) {
      if (my === generation) toLogin(e.status === 401 ? null : e.message);
      return;
    }
  }
  if (my !== generation) return;
  header(page);
  // Each route renders into its own container: a page still loading when the user
  // moves on writes into a container no longer on screen, never over the next page.
  const root = h('div', { class: 'page' }, loading());
  mount(main, root);
  main.setAttribute('aria-busy', 'true');
  try {
    await PAGES[page].render(root, r);
  } catch (e) {
    if (my !== generation) return;
    if (isAuthError(e)) {
      // A project saved from a server that no longer serves it without a key.
      const cur = currentProject();
      if (e.status === 401 && cur?.open) forgetProject(cur.project);
      toLogin(e.message);
      return;
    }
    mount(root, errorBox(e));
  } finally {
    if (my === generation) {
      // Done: a fresh token tells a test (or a script) that this route has rendered.
      main.setAttribute('aria-busy', 'false');
      main.dataset.rendered = Math.random().toString(36).slice(2);
    }
  }
}

/** The header: which page is on, and the project picker. */
function header(page) {
  for (const a of document.querySelectorAll('#nav a')) {
    a.classList.toggle('on', a.dataset.page === page || (page === 'trace' && a.dataset.page === 'traces')
      || (page === 'session' && a.dataset.page === 'sessions'));
  }
  const box = document.getElementById('project');
  const cur = currentProject();
  const list = savedProjects();
  const select = h(
    'select',
    {
      id: 'project-picker',
      'aria-label': 'project',
      onchange: (e) => {
        if (e.target.value === '+') {
          navigate('login');
          return;
        }
        selectProject(e.target.value);
        // One render: by the hash change, or here when the hash stays the same.
        if (location.hash === link('traces')) route();
        else navigate('traces');
      },
    },
    list.map((p) =>
      h('option', { value: p.project, selected: cur && p.project === cur.project }, `${p.project} (${p.environment || '?'})`),
    ),
    h('option', { value: '+' }, 'Add a project key…'),
  );
  mount(
    box,
    cur ? envBadge(cur.environment) : null,
    select,
    cur && !cur.open
      ? h('button', {
        type: 'button',
        class: 'link',
        title: 'forget this project\'s key in this browser',
        onclick: () => {
          forgetProject(cur.project);
          navigate('login');
        },
      }, 'sign out')
      : null,
  );
  document.body.dataset.env = cur?.environment || '';
}

window.addEventListener('hashchange', route);
window.addEventListener('DOMContentLoaded', route);
