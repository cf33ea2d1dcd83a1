// The shell: the project picker in the header and the hash router that renders a
// page into <main>. Pages export `render(root, route)`.

import {
  api, currentProject, currentRoute, envBadge, errorBox, forgetProject, h, loading, mount,
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
      if (my === generation) navigate('login', e.status === 401 ? {} : { error: e.message });
      return;
    }
  }
  header(page);
  mount(main, loading());
  main.setAttribute('aria-busy', 'true');
  try {
    await PAGES[page].render(main, r);
  } catch (e) {
    if (my !== generation) return;
    if (e.status === 401 || e.status === 403) {
      navigate('login', { error: e.message, project: currentProject()?.project });
      return;
    }
    mount(main, errorBox(e));
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
        navigate('traces');
        route();
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
