// The landing page after sign-in: setup state, services, backups at a glance,
// and a notice when an old SQLite database waits to be imported.

import { call } from '../api.js';
import { formatBytes, formatDate, h, replace } from '../dom.js';
import { authedCall } from '../session.js';

const NAMES = { postgres: 'PostgreSQL', api: 'API worker', wal: 'Point-in-time recovery', replication: 'Replication' };

function stateBadge(state) {
  const kind = state === 'ready' ? 'ok' : state === 'failed' ? 'error' : 'warn';
  return h('span', { class: `badge badge-${kind}` }, state);
}

export async function render(main, { setup, me }) {
  // Backups, imports and storage settings are an admin's (the API answers a
  // `user` 403 there): a user's dashboard says so instead of showing errors.
  const admin = !me || me.role === 'admin';
  const services = h('div', {}, h('p', { class: 'hint' }, 'Loading…'));
  const backups = h('div', {}, h('p', { class: 'hint' }, 'Loading…'));
  const migration = h('div', { id: 'migration-notice' });
  const setupDone = setup && !setup.requires_setup;

  replace(main, h('div', { class: 'container' },
    h('div', { class: 'page-head' },
      h('div', {}, h('h1', { id: 'dashboard-title' }, 'Dashboard'), h('p', {}, 'This Omni installation at a glance.'))),
    setup && setup.requires_setup
      ? h('div', { class: 'alert alert-warn', role: 'status' },
        h('strong', {}, 'Setup is not complete'),
        'Choose where Omni keeps its data. ',
        h('a', { href: '/setup' }, 'Open storage configuration'))
      : null,
    migration,
    h('div', { class: 'grid' },
      h('section', { class: 'card', 'aria-labelledby': 'card-setup' },
        h('h2', { id: 'card-setup' }, 'Setup'),
        h('p', { class: 'stat-value' }, setup ? (setupDone ? 'Complete' : 'Not complete') : 'Unknown'),
        h('p', { class: 'hint' }, setup && setup.storage
          ? (setup.storage.memory_mode ? 'In-memory storage' : `Data directory ${setup.storage.data_dir}`)
          : 'Default storage'),
        admin ? h('a', { href: '/setup' }, setupDone ? 'Review storage settings' : 'Configure storage') : null),
      h('section', { class: 'card', 'aria-labelledby': 'card-services' },
        h('h2', { id: 'card-services' }, 'Services'),
        services,
        h('a', { href: '/status' }, 'Open status')),
      h('section', { class: 'card', 'aria-labelledby': 'card-backups' },
        h('h2', { id: 'card-backups' }, 'Backups'),
        admin ? backups : h('p', { class: 'hint', id: 'backups-admin-only' }, 'Backups are managed by an admin.'),
        admin ? h('a', { href: '/backups' }, 'Manage backups') : null))));

  call('/gateway/status').then((status) => {
    const components = (status && status.components) || [];
    replace(services, components.length
      ? h('ul', { class: 'kv', style: 'list-style:none;padding:0' },
        components.map((c) => [h('li', {}, NAMES[c.name] || c.name), h('li', { style: 'text-align:right' }, stateBadge(c.state))]))
      : h('p', { class: 'hint' }, 'No components reported.'));
  }).catch((error) => replace(services, h('p', { class: 'hint' }, error.message)));

  if (!admin) return;

  authedCall('/api/v1/migration/status').then((check) => {
    if (!check || !check.sqlite_found || !check.migration_recommended) return;
    replace(migration, h('div', { class: 'alert alert-warn', role: 'status' },
      h('strong', {}, 'An old database was found'),
      'An SQLite file from an earlier version of Omni is at ', h('code', {}, check.sqlite_path),
      '. Its data is not in PostgreSQL yet. ',
      h('a', { href: '/import', id: 'review-import' }, 'Review and import it')));
  }).catch(() => { /* the notice is a hint; the import page reports errors */ });

  authedCall('/api/v1/backup/list').then((body) => {
    const list = (body && body.backups) || [];
    replace(backups,
      h('p', { class: 'stat-value' }, `${list.length} ${list.length === 1 ? 'backup' : 'backups'}`),
      h('p', { class: 'hint' }, list.length
        ? `Newest ${formatDate(list[0].created_at)}, ${formatBytes(list[0].size_bytes)}`
        : 'No backup yet.'));
  }).catch((error) => replace(backups, h('p', { class: 'hint' },
    error.status === 404 ? 'Backups are not available on this server.' : error.message)));
}
