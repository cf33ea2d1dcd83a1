// Adding a project: a query key, checked with the server (GET /api/v1/whoami), kept
// in this browser's local storage.

import { api, envBadge, errorBox, h, mount, navigate, saveProject, savedProjects } from './core.js';

export async function render(root) {
  // Why the user was sent here and where they were, from the page that sent them
  // (kept out of the URL, so that a link cannot put words in the app's mouth).
  const error = h('div');
  const why = sessionStorage.getItem('loupe.login-error');
  sessionStorage.removeItem('loupe.login-error');
  if (why) mount(error, errorBox(why));
  const input = h('input', {
    id: 'query-key',
    type: 'password',
    autocomplete: 'off',
    placeholder: 'loupe_qk_…',
    'aria-label': 'query key',
    size: 48,
  });
  const form = h(
    'form',
    {
      class: 'login',
      onsubmit: async (e) => {
        e.preventDefault();
        const key = input.value.trim();
        if (!key) return;
        try {
          const me = await api('/api/v1/whoami', null, { key });
          saveProject({ project: me.project, environment: me.environment, key });
          const next = sessionStorage.getItem('loupe.login-next');
          sessionStorage.removeItem('loupe.login-next');
          if (next) location.hash = next;
          else navigate('traces');
        } catch (err) {
          mount(error, errorBox(err.status === 401 ? 'This key is not known here.' : err.status === 403
            ? 'This is not a query key (ingest keys only send spans).' : err.message));
        }
      },
    },
    h('h1', {}, 'Open a project'),
    h('p', {}, 'Each project (one per namespace and environment) has its own query key: ',
      h('code', {}, 'kubectl get secret <project>-loupe-keys -o jsonpath={.data.query-key} | base64 -d'),
      ', or ', h('code', {}, 'loupe keys new --scope query'), ' for a standalone config. The key stays in this browser.'),
    h('label', {}, 'Query key ', input),
    h('button', { type: 'submit' }, 'Open'),
    error,
  );
  const saved = savedProjects();
  mount(
    root,
    form,
    saved.length
      ? h('section', { class: 'saved' }, h('h2', {}, 'Projects in this browser'),
        h('ul', {}, saved.map((p) => h('li', {}, envBadge(p.environment), ' ', h('a', {
          href: '#/traces',
          onclick: () => saveProject(p),
        }, p.project)))))
      : null,
  );
  input.focus();
}
