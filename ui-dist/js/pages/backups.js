// Backups (SPEC §6): create, list, download, restore, delete.
//
// Downloads need the x-api-key header, which a plain link cannot send, so the
// file is fetched and handed to the browser as a blob. Restore and delete ask
// for confirmation in a modal dialog; the restore dialog says that a safety
// backup of the current database is taken first, and names it afterwards.

import { ApiError, errorFrom } from '../api.js';
import { formatBytes, formatDate, h, replace } from '../dom.js';
import { authedCall, authedFetch } from '../session.js';

const NAME = /^omni_backup_[0-9]{8}_[0-9]{6}\.sql$/;

/** The name a backup taken now gets: omni_backup_YYYYMMDD_HHMMSS.sql (UTC). */
function nameForNow() {
  const iso = new Date().toISOString();
  return `omni_backup_${iso.slice(0, 10).replaceAll('-', '')}_${iso.slice(11, 19).replaceAll(':', '')}.sql`;
}

/** The safety backup's name from a restore answer, whatever the field is called. */
function safetyBackupName(result) {
  if (!result || typeof result !== 'object') return null;
  for (const [field, value] of Object.entries(result)) {
    if (/safety/i.test(field)) {
      if (typeof value === 'string') return value;
      if (value && typeof value === 'object') return value.backup_file || value.filename || null;
    }
  }
  return null;
}

/** A modal confirmation; resolves true when confirmed. */
function confirmDialog({ title, body, confirmLabel, danger }) {
  return new Promise((resolve) => {
    const dialog = h('dialog', { 'aria-labelledby': 'confirm-title', 'aria-describedby': 'confirm-body' },
      h('h2', { id: 'confirm-title' }, title),
      h('div', { id: 'confirm-body' }, body),
      h('form', { method: 'dialog', class: 'actions' },
        h('button', { value: 'cancel', class: 'btn', autofocus: true }, 'Cancel'),
        h('button', { value: 'confirm', class: danger ? 'btn btn-danger-solid' : 'btn btn-primary', id: 'confirm-action' }, confirmLabel)));
    dialog.addEventListener('close', () => {
      resolve(dialog.returnValue === 'confirm');
      dialog.remove();
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}

export async function render(main) {
  const message = h('div', { id: 'backup-message', role: 'status', 'aria-live': 'polite' });
  const list = h('div', { class: 'table-wrap' }, h('p', { class: 'loading' }, 'Loading backups…'));
  let busy = false;

  const createButton = h('button', { type: 'button', class: 'btn btn-primary', id: 'create-backup', onclick: create }, 'Create backup');

  function say(kind, text, strong) {
    replace(message, h('div', { class: `alert alert-${kind}`, role: kind === 'error' ? 'alert' : 'status' },
      strong ? h('strong', {}, strong) : null, text));
  }

  function setBusy(value) {
    busy = value;
    createButton.disabled = value;
    for (const button of list.querySelectorAll('button')) button.disabled = value;
  }

  function unavailable(error) {
    replace(list, h('div', { class: 'alert alert-warn', role: 'status', id: 'backups-unavailable' },
      h('strong', {}, 'Backups are not available'),
      `This server does not offer the backup API yet (${error.message})`));
    createButton.disabled = true;
  }

  async function refresh() {
    let body;
    try {
      body = await authedCall('/api/v1/backup/list');
    } catch (error) {
      if (error instanceof ApiError && (error.status === 404 || error.status === 405)) {
        unavailable(error);
      } else {
        replace(list, h('div', { class: 'alert alert-error', role: 'alert' }, error.message));
      }
      return;
    }
    const backups = (body && body.backups) || [];
    if (!backups.length) {
      replace(list, h('p', { class: 'empty', id: 'no-backups' }, 'No backups yet. Create one to keep a copy of the database.'));
      return;
    }
    replace(list, h('table', { class: 'responsive', id: 'backup-table' },
      h('caption', { class: 'visually-hidden' }, 'Backups, newest first'),
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col' }, 'File'),
        h('th', { scope: 'col' }, 'Size'),
        h('th', { scope: 'col' }, 'Created'),
        h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Actions')))),
      h('tbody', {}, backups.map((backup) => h('tr', { dataset: { filename: backup.filename } },
        h('td', { class: 'file mono' }, backup.filename),
        h('td', { class: 'num', 'data-label': 'Size' }, formatBytes(backup.size_bytes)),
        h('td', { 'data-label': 'Created' }, h('time', { datetime: backup.created_at }, formatDate(backup.created_at))),
        h('td', { 'data-label': 'Actions' }, h('div', { class: 'row-actions' },
          h('button', { type: 'button', class: 'btn btn-sm', onclick: () => download(backup.filename), 'aria-label': `Download ${backup.filename}` }, 'Download'),
          h('button', { type: 'button', class: 'btn btn-sm', onclick: () => restore(backup.filename), 'aria-label': `Restore ${backup.filename}` }, 'Restore'),
          h('button', { type: 'button', class: 'btn btn-sm btn-danger', onclick: () => remove(backup.filename), 'aria-label': `Delete ${backup.filename}` }, 'Delete'))))))));
  }

  async function create() {
    if (busy) return;
    setBusy(true);
    say('info', 'Creating a backup of the database…');
    try {
      const result = await authedCall('/api/v1/backup/create', { method: 'POST' });
      say('ok', `${result.backup_file} (${formatBytes(result.size_bytes)})`, 'Backup created');
      await refresh();
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) unavailable(error);
      say('error', error.message, 'The backup was not created');
    } finally {
      setBusy(false);
    }
  }

  async function download(filename) {
    if (!NAME.test(filename)) return;
    try {
      const response = await authedFetch(`/api/v1/backup/download/${encodeURIComponent(filename)}`);
      if (!response.ok) {
        const text = await response.text();
        let body = null;
        try { body = JSON.parse(text); } catch { /* not JSON */ }
        throw errorFrom(response, body);
      }
      const url = URL.createObjectURL(await response.blob());
      const link = h('a', { href: url, download: filename, hidden: true });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
      say('ok', filename, 'Download started');
    } catch (error) {
      say('error', error.message, 'The download failed');
    }
  }

  async function restore(filename) {
    const safety = nameForNow();
    const confirmed = await confirmDialog({
      title: 'Restore this backup?',
      body: [
        h('p', {}, 'The database will be replaced by the contents of ', h('code', {}, filename), '.'),
        h('p', {}, 'First, Omni saves the current database as a safety backup, named like ',
          h('code', { id: 'safety-name' }, safety),
          ', so you can undo this by restoring it.'),
      ],
      confirmLabel: 'Restore',
      danger: true,
    });
    if (!confirmed) return;
    setBusy(true);
    say('info', `Restoring ${filename}…`);
    try {
      const result = await authedCall(`/api/v1/backup/restore/${encodeURIComponent(filename)}`, { method: 'POST' });
      const saved = safetyBackupName(result);
      say('ok', saved ? `The previous state was saved as ${saved}.` : (result && result.message) || filename,
        `Restored ${filename}`);
      await refresh();
    } catch (error) {
      say('error', `${error.message} The database was left as it was.`, 'The restore failed');
    } finally {
      setBusy(false);
    }
  }

  async function remove(filename) {
    const confirmed = await confirmDialog({
      title: 'Delete this backup?',
      body: h('p', {}, h('code', {}, filename), ' will be deleted from the server. This cannot be undone.'),
      confirmLabel: 'Delete',
      danger: true,
    });
    if (!confirmed) return;
    setBusy(true);
    try {
      await authedCall(`/api/v1/backup/${encodeURIComponent(filename)}`, { method: 'DELETE' });
      say('ok', filename, 'Backup deleted');
      await refresh();
    } catch (error) {
      say('error', error.message, 'The backup was not deleted');
    } finally {
      setBusy(false);
    }
  }

  replace(main, h('div', { class: 'container' },
    h('div', { class: 'page-head' },
      h('div', {}, h('h1', {}, 'Backups'), h('p', {}, 'Full copies of the database, made with pg_dump.')),
      createButton),
    message,
    h('section', { class: 'card', 'aria-label': 'Backup files' }, list)));
  await refresh();
}
