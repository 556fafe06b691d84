// Backups (SPEC §6): create, list, download, restore, delete; and
// point-in-time recovery (issue 14): the recoverable window, a time picker
// to restore to a moment, "take a base backup now", base backups with their
// verification. A restore to a time answers only once the database serves
// again; meanwhile the page shows its step and percentage from
// /gateway/status.
//
// Downloads need the x-api-key header, which a plain link cannot send, so the
// file is fetched and handed to the browser as a blob. Restore and delete ask
// for confirmation in a modal dialog; the restore dialog says that a safety
// backup of the current database is taken first, and names it afterwards.
//
// Beside the local window, the off-site one (`offsite` of the window: what
// the repository alone restores) when OMNI_REPOSITORY_URL is set.
//
// The off-site card shows the repository's shipper (GET /gateway/status
// `repository`: state, last upload, lag, queue, last error) and its "Test
// connection" button (POST /api/v1/backup/repository/test), which names the
// step that failed and why, and "Last verified off-site" (`last_verified`:
// the last drill of the repository; a damaged object is named).

import { ApiError, errorFrom } from '../api.js';
import { formatBytes, formatDate, formatDuration, h, replace } from '../dom.js';
import { authedCall, authedFetch, signedOutAfterRestore, whoAmI } from '../session.js';

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

/** `YYYY-MM-DDTHH:MM:SS` in local time, for a datetime-local input. */
function localInputValue(date) {
  const pad = (n) => String(n).padStart(2, '0');
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

/** The point-in-time recovery card. */
function pointInTime() {
  const message = h('div', { id: 'pitr-message', role: 'status', 'aria-live': 'polite' });
  const windowText = h('p', { id: 'pitr-window' }, 'Loading the recoverable window…');
  const offsiteText = h('p', { id: 'offsite-window', hidden: true });
  const picker = h('input', { type: 'datetime-local', id: 'pitr-time', step: '1', required: true });
  const restoreButton = h('button', { type: 'button', class: 'btn btn-danger', id: 'pitr-restore', onclick: restoreToTime }, 'Restore to this time');
  const baseButton = h('button', { type: 'button', class: 'btn', id: 'take-base-backup', onclick: takeBase }, 'Take a base backup now');
  const progress = h('progress', { id: 'pitr-progress', max: '100', value: '0', hidden: true, 'aria-label': 'Restore progress' });
  const list = h('div', { class: 'table-wrap', id: 'base-backups' });
  let busy = false;

  function say(kind, text, strong) {
    replace(message, h('div', { class: `alert alert-${kind}`, role: kind === 'error' ? 'alert' : 'status' },
      strong ? h('strong', {}, strong) : null, text));
  }

  function setBusy(value) {
    busy = value;
    for (const el of [picker, restoreButton, baseButton]) el.disabled = value;
  }

  async function refresh() {
    let w;
    try {
      w = await authedCall('/api/v1/backup/window');
    } catch (error) {
      if (error instanceof ApiError && (error.status === 404 || error.status === 409)) {
        replace(windowText, h('span', { id: 'pitr-unavailable' }, `Point-in-time recovery is not available here: ${error.message}`));
        setBusy(true);
      } else {
        replace(windowText, error.message);
      }
      return;
    }
    if (!w.earliest) {
      replace(windowText, 'No verified base backup yet: the recoverable window starts with the first one, taken as soon as WAL streaming runs.');
      restoreButton.disabled = true;
    } else {
      const latest = w.streaming ? new Date() : new Date(w.latest);
      replace(windowText, 'You can restore the database to any moment from ',
        h('time', { datetime: w.earliest, id: 'pitr-earliest' }, formatDate(w.earliest)), ' to ',
        w.streaming ? h('strong', {}, 'now') : h('time', { datetime: w.latest, id: 'pitr-latest' }, formatDate(w.latest)),
        w.streaming ? ' (changes are archived continuously).' : ' (WAL streaming is not running right now).');
      picker.min = localInputValue(new Date(w.earliest));
      picker.max = localInputValue(latest);
      if (!picker.value) picker.value = localInputValue(latest);
    }
    showOffsite(w.offsite);
    const backups = w.base_backups || [];
    replace(list, backups.length ? h('table', { class: 'responsive', id: 'base-backup-table' },
      h('caption', { class: 'visually-hidden' }, 'Base backups, newest first'),
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col' }, 'Base backup'), h('th', { scope: 'col' }, 'Size'),
        h('th', { scope: 'col' }, 'Finished'), h('th', { scope: 'col' }, 'Verification'))),
      h('tbody', {}, backups.map((b) => h('tr', { dataset: { id: b.id } },
        h('td', { class: 'file mono' }, b.id),
        h('td', { class: 'num', 'data-label': 'Size' }, formatBytes(b.bytes)),
        h('td', { 'data-label': 'Finished' }, h('time', { datetime: b.finished_at }, formatDate(b.finished_at))),
        h('td', { 'data-label': 'Verification' }, b.verified ? 'Verified (pg_verifybackup)' : 'Not verified'))))) : h('p', { class: 'empty' }, 'No base backup yet.'));
    if (w.last_drill) {
      list.append(h('p', { id: 'pitr-drill', class: w.last_drill.ok ? '' : 'alert alert-error' },
        w.last_drill.ok ? `Last restore drill passed on ${formatDate(w.last_drill.at)}.` : `The last restore drill FAILED on ${formatDate(w.last_drill.at)}: ${w.last_drill.detail || ''}`));
    }
  }

  /** The off-site window beside the local one: what the bucket alone restores. */
  function showOffsite(o) {
    offsiteText.hidden = !o;
    if (!o) return;
    offsiteText.className = o.error ? 'alert alert-error' : '';
    if (o.error) {
      replace(offsiteText, h('strong', {}, 'Off-site window unknown: '), o.error);
    } else if (!o.earliest) {
      replace(offsiteText, 'Off-site (', h('span', { class: 'mono' }, o.repository), '): no complete base backup there yet, so nothing can be restored from it alone.');
    } else if (!o.latest) {
      replace(offsiteText, 'Off-site (', h('span', { class: 'mono' }, o.repository), '): a base backup ending ',
        h('time', { datetime: o.earliest, id: 'offsite-earliest' }, formatDate(o.earliest)), ', but the WAL after it is not there yet.');
    } else {
      replace(offsiteText, 'Off-site (', h('span', { class: 'mono' }, o.repository), '), a new machine can restore from ',
        h('time', { datetime: o.earliest, id: 'offsite-earliest' }, formatDate(o.earliest)), ' to ',
        h('time', { datetime: o.latest, id: 'offsite-latest' }, formatDate(o.latest)),
        ` (${o.base_backups} base ${o.base_backups === 1 ? 'backup' : 'backups'} there).`);
    }
  }

  async function takeBase() {
    if (busy) return;
    setBusy(true);
    say('info', 'Taking a base backup and verifying it…');
    try {
      const b = await authedCall('/api/v1/backup/base', { method: 'POST' });
      say('ok', `${b.id} (${formatBytes(b.bytes)}), verified with pg_verifybackup`, 'Base backup taken');
    } catch (error) {
      say('error', error.message, 'The base backup was not taken');
    } finally {
      setBusy(false);
      await refresh();
    }
  }

  /** Shows the restore's step from /gateway/status until `done` resolves. */
  async function followProgress(done) {
    progress.hidden = false;
    let finished = false;
    done.finally(() => { finished = true; });
    while (!finished) {
      try {
        const status = await (await fetch('/gateway/status', { headers: { accept: 'application/json' } })).json();
        const r = status.restore;
        if (r && r.state === 'running') {
          progress.value = r.percent;
          say('info', `${r.step} (${r.percent}%)`, 'Restoring… ');
        }
      } catch { /* the gateway answers again in a moment */ }
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
    progress.hidden = true;
  }

  async function restoreToTime() {
    if (busy || !picker.value) return;
    const when = new Date(picker.value);
    if (Number.isNaN(when.getTime())) return;
    const target = when.toISOString();
    const confirmed = await confirmDialog({
      title: 'Restore the database to this time?',
      body: [
        h('p', {}, 'The database will be rewound to ', h('strong', { id: 'pitr-confirm-time' }, formatDate(target)),
          '. Everything written after that moment will no longer be in it.'),
        h('p', {}, 'While it restores, the database is stopped and requests that need it answer "unavailable"; this page shows the progress. ',
          'The current data is not deleted: the server keeps it aside (omni-gateway restore --discard-previous removes it), ',
          'and if anything fails it is put back and serves again.'),
      ],
      confirmLabel: 'Restore',
      danger: true,
    });
    if (!confirmed) return;
    setBusy(true);
    say('info', `Restoring to ${formatDate(target)}…`, 'Restoring… ');
    const call = authedCall('/api/v1/backup/restore-to', { method: 'POST', json: { target_time: target } });
    const watching = followProgress(call);
    let sessionGone = false;
    try {
      const result = await call;
      await watching;
      say('ok', `From base backup ${result.base_backup} in ${(result.took_ms / 1000).toFixed(1)} s; the database serves again.`,
        `Restored to ${formatDate(target)}. `);
      // Sessions live in the database too: one opened after that moment is
      // gone with the rest. Say so on the sign-in page instead of a bare sign-out.
      if (!(await whoAmI({ fresh: true }).catch(() => true))) {
        sessionGone = true;
        signedOutAfterRestore(`Restored to ${formatDate(target)}. Your session began after that moment, so it was rewound with the data: sign in again.`);
      }
    } catch (error) {
      await watching;
      say('error', error.message, 'The restore did not happen. ');
    } finally {
      setBusy(false);
      if (!sessionGone) await refresh();
    }
  }

  const card = h('section', { class: 'card', 'aria-labelledby': 'pitr-title', id: 'pitr' },
    h('h2', { id: 'pitr-title' }, 'Point-in-time recovery'),
    windowText,
    offsiteText,
    h('div', { class: 'actions' },
      h('label', { for: 'pitr-time' }, 'Restore to '), picker, restoreButton, baseButton),
    progress,
    message,
    list);
  return { card, refresh };
}

const REASONS = {
  wrong_credentials: 'wrong credentials',
  permission_denied: 'not permitted',
  no_bucket: 'no such bucket',
  clock_skew: 'clock skew',
  tls: 'TLS',
  unreachable: 'unreachable',
  conflict: 'conflict',
  other: 'error',
};
const REPOSITORY_STATE = { ok: 'ok', starting: 'info', retrying: 'warn', stopped: 'error' };

/** The off-site repository card. */
function offsite() {
  const message = h('div', { id: 'offsite-message', role: 'status', 'aria-live': 'polite' });
  const facts = h('div', { id: 'offsite-state' }, h('p', { class: 'loading' }, 'Loading…'));
  const testButton = h('button', { type: 'button', class: 'btn', id: 'offsite-test', onclick: test }, 'Test connection');

  async function refresh() {
    let status;
    try {
      status = await (await fetch('/gateway/status', { headers: { accept: 'application/json' } })).json();
    } catch (error) {
      replace(facts, h('p', { class: 'alert alert-error', role: 'alert' }, `The gateway's status could not be read: ${error.message}`));
      return;
    }
    const r = status.repository;
    if (!r) {
      testButton.disabled = true;
      replace(facts, h('p', { id: 'offsite-none' }, 'No off-site repository: every copy of the data is on this machine. Set ',
        h('code', {}, 'OMNI_REPOSITORY_URL'), ' (s3://, gs://, az:// or file://) to keep base backups, WAL and backups elsewhere.'));
      return;
    }
    testButton.disabled = false;
    const last = r.last_upload_unix ? new Date(r.last_upload_unix * 1000).toISOString() : null;
    replace(facts, h('dl', { class: 'kv' },
      h('dt', {}, 'Repository'), h('dd', { class: 'mono', dataset: { field: 'url' } }, r.url),
      h('dt', {}, 'State'), h('dd', {}, h('span', { class: `badge badge-${REPOSITORY_STATE[r.state] || 'warn'}`, dataset: { field: 'state' } }, r.state)),
      h('dt', {}, 'Last upload'), h('dd', { dataset: { field: 'last-upload' } }, last ? h('time', { datetime: last }, formatDate(last)) : 'none yet'),
      h('dt', {}, 'Behind by'), h('dd', { dataset: { field: 'lag' } }, r.lag_bytes ? `${formatBytes(r.lag_bytes)} in ${r.queue_depth} objects, oldest ${formatDuration(r.lag_seconds)}` : 'nothing'),
      r.retention ? [h('dt', {}, 'Retention'), h('dd', { dataset: { field: 'retention', delete: String(r.retention.delete) } }, r.retention.summary)] : null,
      r.queue_full ? [h('dt', {}, 'Queue'), h('dd', { class: 'alert alert-warn', dataset: { field: 'queue-full' } }, `over its limit of ${formatBytes(r.queue_max_bytes)}: uploads are not keeping up`)] : null,
      r.last_error ? [h('dt', {}, 'Last error'), h('dd', { dataset: { field: 'last-error' } }, r.last_error)] : null,
      r.encryption ? [h('dt', {}, 'Encryption'), h('dd', { class: 'mono', dataset: { field: 'encryption' } }, r.encryption)] : null,
      r.heartbeat ? [h('dt', {}, 'Heartbeat'), h('dd', { dataset: { field: 'heartbeat', kind: r.heartbeat.kind } },
        `${r.heartbeat.kind === 'ok' ? 'alive' : 'failure'} ${r.heartbeat.delivered ? 'told' : 'NOT delivered'} at ${formatDate(new Date(r.heartbeat.at * 1000).toISOString())}: ${r.heartbeat.detail}`)] : null,
      [h('dt', {}, 'Last verified off-site'), lastVerified(r.last_verified)],
      (r.warnings || []).map((w) => [h('dt', {}, 'Warning'), h('dd', { class: 'alert alert-warn', dataset: { field: 'warning' } }, w)])));
  }

  /** The last drill of the repository: when, what it checked, or the object that is damaged. */
  function lastVerified(v) {
    if (!v) {
      return h('dd', { dataset: { field: 'last-verified', ok: '' } }, 'not yet: the repository is drilled after each restore drill (OMNI_BACKUP_DRILL_INTERVAL)');
    }
    const when = h('time', { datetime: v.at }, formatDate(v.at));
    if (v.ok) {
      return h('dd', { dataset: { field: 'last-verified', ok: 'true', manifestOnly: String(v.manifest_only) } },
        v.manifest_only ? 'checked against the manifest only on ' : 'passed on ', when, `: ${v.summary}`);
    }
    const lastGood = v.last_success ? [' The last drill that passed was on ', h('time', { datetime: v.last_success }, formatDate(v.last_success)), '.'] : ' No drill has passed yet.';
    return h('dd', { class: 'alert alert-error', role: 'alert', dataset: { field: 'last-verified', ok: 'false' } },
      // `.alert strong` is a line of its own: the date goes with it.
      h('strong', {}, 'FAILED on ', when),
      v.damaged_object ? ['The object ', h('span', { class: 'mono', dataset: { field: 'damaged-object' } }, v.damaged_object), ' is damaged. '] : null,
      v.error && !/[.!?]$/.test(v.error) ? `${v.error}.` : v.error, lastGood);
  }

  async function test() {
    testButton.disabled = true;
    replace(message, h('div', { class: 'alert alert-info', role: 'status' }, 'Writing, reading, listing and deleting a probe object…'));
    try {
      const report = await authedCall('/api/v1/backup/repository/test', { method: 'POST' });
      const steps = h('ul', { class: 'steps', id: 'offsite-steps' }, report.steps.map((s) => h('li', { dataset: { step: s.step, ok: String(s.ok) } },
        `${s.ok ? '✓' : '✗'} ${s.step} (${s.ms} ms)`)));
      if (report.ok) {
        replace(message, h('div', { class: 'alert alert-ok', role: 'status', id: 'offsite-test-ok' }, h('strong', {}, 'The repository works. '), report.summary, steps));
      } else {
        const failed = report.steps.find((s) => !s.ok);
        replace(message, h('div', { class: 'alert alert-error', role: 'alert', id: 'offsite-test-failed', dataset: { reason: report.reason || '' } },
          h('strong', {}, `Test failed: ${REASONS[report.reason] || report.reason}. `), report.summary,
          failed && failed.detail ? h('p', { class: 'mono' }, failed.detail) : null, steps));
      }
    } catch (error) {
      replace(message, h('div', { class: 'alert alert-error', role: 'alert' }, h('strong', {}, 'The test did not run. '), error.message));
    } finally {
      testButton.disabled = false;
      await refresh();
    }
  }

  const card = h('section', { class: 'card', 'aria-labelledby': 'offsite-title', id: 'offsite' },
    h('h2', { id: 'offsite-title' }, 'Off-site copy'),
    facts,
    h('div', { class: 'actions' }, testButton),
    message);
  return { card, refresh };
}

export async function render(main) {
  const message = h('div', { id: 'backup-message', role: 'status', 'aria-live': 'polite' });
  const list = h('div', { class: 'table-wrap' }, h('p', { class: 'loading' }, 'Loading backups…'));
  let busy = false;
  const pitr = pointInTime();
  const remote = offsite();

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
        h('td', { class: 'file mono' }, backup.filename, backup.encrypted
          ? [' ', h('span', { class: 'badge badge-info', dataset: { field: 'encrypted' }, title: 'Kept encrypted with age (OMNI_ENCRYPT_LOCAL): the download is the encrypted file, and a restore needs OMNI_DECRYPT_IDENTITY_FILE' }, 'Encrypted')]
          : null),
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

  // Saved under the name the server gives (Content-Disposition): an
  // encrypted backup is the age file it is, `<name>.age`.
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
      const named = /filename="([^"]+)"/.exec(response.headers.get('content-disposition') || '');
      const link = h('a', { href: url, download: named ? named[1] : filename, hidden: true });
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
    h('section', { class: 'card', 'aria-label': 'Backup files' }, list),
    pitr.card,
    remote.card));
  await Promise.all([refresh(), pitr.refresh(), remote.refresh()]);
}
