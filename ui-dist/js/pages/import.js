// Import of the old SQLite database (SPEC §6, POST /api/v1/migration/import).
//
// The way through is: the dashboard's notice → this page → a dry run, whose
// report says what an import would do → Import, confirmed in a dialog that
// says a safety backup comes first and that a failure changes nothing →
// progress (GET /migration/status shows the running import) → the report.
// The file is the one the server detected, or one chosen here and uploaded
// as the request body.

import { ApiError, errorFrom } from '../api.js';
import { formatBytes, h, replace } from '../dom.js';
import { authedCall, authedFetch } from '../session.js';

const IMPORT = '/api/v1/migration/import';
const STATUS = '/api/v1/migration/status';

/** A modal confirmation; resolves true when confirmed. */
function confirmDialog(source) {
  return new Promise((resolve) => {
    const dialog = h('dialog', { 'aria-labelledby': 'import-confirm-title', 'aria-describedby': 'import-confirm-body' },
      h('h2', { id: 'import-confirm-title' }, 'Import this database?'),
      h('div', { id: 'import-confirm-body' },
        h('p', {}, 'The rows of ', h('code', {}, source), ' are added to Omni\u2019s PostgreSQL database. The file itself is only read.'),
        h('p', {}, 'First, Omni takes a safety backup of the current database. The import then runs as one transaction: '
          + 'if anything fails, nothing of it is kept. Rows already present are left as they are.')),
      h('form', { method: 'dialog', class: 'actions' },
        h('button', { value: 'cancel', class: 'btn', autofocus: true }, 'Cancel'),
        h('button', { value: 'confirm', class: 'btn btn-primary', id: 'import-confirm' }, 'Import')));
    dialog.addEventListener('close', () => {
      resolve(dialog.returnValue === 'confirm');
      dialog.remove();
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}

/** The per-table report as a table, with what was skipped and why below it. */
export function reportView(report, { id = 'import-report' } = {}) {
  const seconds = (report.duration_ms / 1000).toFixed(1);
  const notes = [];
  for (const t of report.tables) {
    for (const s of t.skipped) notes.push(h('li', {}, h('strong', {}, t.table), ` — ${s.rows} skipped: ${s.reason}`, s.examples.length ? ` (e.g. ${s.examples.join(', ')})` : ''));
    for (const s of t.references_cleared) notes.push(h('li', {}, h('strong', {}, t.table), ` — ${s.rows} kept with ${s.reason}`, s.examples.length ? ` (e.g. ${s.examples.join(', ')})` : ''));
    if (t.conflicts) notes.push(h('li', {}, h('strong', {}, t.table), ` — ${t.conflicts} conflicts left as they are`, t.conflict_examples.length ? ` (e.g. ${t.conflict_examples.join(', ')})` : ''));
    if (t.columns_dropped.length) notes.push(h('li', {}, h('strong', {}, t.table), ` — columns Omni no longer has, not imported: ${t.columns_dropped.join(', ')}`));
    if (t.source_table && t.columns_defaulted.length) notes.push(h('li', {}, h('strong', {}, t.table), ` — columns missing from the file, given their default: ${t.columns_defaulted.join(', ')}`));
  }
  const cell = (label, value) => h('td', { class: 'num', 'data-label': label }, String(value));
  return h('section', { class: 'card', id, 'aria-label': report.dry_run ? 'Dry run report' : 'Import report' },
    h('h2', {}, report.dry_run ? 'Dry run: nothing was written' : 'Imported'),
    h('p', { class: 'summary' },
      `${report.rows_in_file} rows in the file: ${report.imported} ${report.dry_run ? 'would be imported' : 'imported'}, `
      + `${report.already_present} already present, ${report.conflicts} conflicts, ${report.skipped} skipped `
      + `(${seconds} s, ${report.rows_per_second} rows/s).`),
    report.safety_backup ? h('p', { class: 'hint' }, 'Safety backup taken first: ', h('code', {}, report.safety_backup)) : null,
    h('div', { class: 'table-wrap' }, h('table', { class: 'responsive' },
      h('caption', { class: 'visually-hidden' }, 'Rows per table'),
      h('thead', {}, h('tr', {}, ['Table', 'Rows in the file', 'Imported', 'Already present', 'Conflicts', 'Skipped']
        .map((label) => h('th', { scope: 'col' }, label)))),
      h('tbody', {}, report.tables.map((t) => h('tr', { dataset: { table: t.table } },
        h('td', { class: 'file mono' }, t.table, t.source_table ? '' : ' (not in the file)'),
        cell('Rows in the file', t.rows_in_file),
        cell('Imported', t.imported),
        cell('Already present', t.already_present),
        cell('Conflicts', t.conflicts),
        cell('Skipped', t.skipped.reduce((n, s) => n + s.rows, 0))))))),
    notes.length ? h('ul', { class: 'notes' }, notes) : null);
}

export async function render(main) {
  const message = h('div', { id: 'import-message', role: 'status', 'aria-live': 'polite' });
  const detected = h('div', {}, h('p', { class: 'loading' }, 'Looking for an old database…'));
  const progress = h('div', { id: 'import-progress', hidden: true });
  const result = h('div', { id: 'import-result' });
  const last = h('div', { id: 'import-last' });
  const fileInput = h('input', { type: 'file', id: 'import-file', accept: '.db,.sqlite,.sqlite3,application/vnd.sqlite3,application/octet-stream' });
  let status = null;
  let busy = false;
  let stopped = false;

  function say(kind, text, strong) {
    replace(message, h('div', { class: `alert alert-${kind}`, role: kind === 'error' ? 'alert' : 'status' },
      strong ? h('strong', {}, strong) : null, text));
  }

  function setBusy(value) {
    busy = value;
    for (const button of main.querySelectorAll('button[data-import]')) button.disabled = value || (button.dataset.import === 'detected' && !status?.sqlite_found);
    fileInput.disabled = value;
  }

  async function refresh() {
    try {
      status = await authedCall(STATUS);
    } catch (error) {
      replace(detected, h('div', { class: 'alert alert-error', role: 'alert' }, error.message));
      return;
    }
    replace(detected, status.sqlite_found
      ? [h('p', {}, 'Found: ', h('code', { id: 'detected-path' }, status.sqlite_path)),
        h('p', { class: 'hint' }, status.migration_recommended
          ? 'Nothing of it has been imported yet.'
          : 'This file has been imported; importing it again adds only rows that are not there yet.')]
      : h('p', { id: 'nothing-detected' }, 'No SQLite database was found in the usual places (data/automagik-omni.db, automagik-omni.db, omni.db, data/omni.db). Choose a file below instead.'));
    // Right after an import its report is already on the page.
    replace(last, status.last_import && !result.hasChildNodes()
      ? [h('h2', {}, 'Last import'), reportView(status.last_import, { id: 'last-import-report' })]
      : null);
    setBusy(busy);
  }

  /** Shows the running import's progress until `done` settles. */
  async function watch(done) {
    let finished = false;
    done.finally(() => { finished = true; });
    const bar = h('progress', { max: '1', value: '0', 'aria-label': 'Import progress' });
    const text = h('p', { class: 'hint' }, 'Starting…');
    replace(progress, h('div', { class: 'alert alert-info' }, h('strong', {}, 'Importing…'), bar, text));
    progress.hidden = false;
    while (!finished && !stopped) {
      try {
        const now = await authedCall(STATUS);
        const running = now && now.running_import;
        if (running) {
          bar.max = Math.max(running.all_rows, 1);
          bar.value = running.all_rows_done;
          text.textContent = `Table ${running.table_number} of ${running.tables_total}: ${running.table} — ${running.rows_done} of ${running.table_rows} rows`;
        }
      } catch { /* the answer of the import itself tells what went wrong */ }
      await Promise.race([done.catch(() => {}), new Promise((resolve) => setTimeout(resolve, 400))]);
    }
    progress.hidden = true;
  }

  /** Runs one import (or dry run) of the detected file or of the chosen one. */
  async function run({ dryRun, upload }) {
    if (busy) return;
    const file = upload ? fileInput.files[0] : null;
    if (upload && !file) {
      say('error', 'Choose the SQLite file first.', 'No file chosen');
      return;
    }
    const source = file ? file.name : status?.sqlite_path;
    if (!dryRun && !(await confirmDialog(source))) return;
    setBusy(true);
    replace(result);
    say('info', dryRun ? `Dry run of ${source}: checking what an import would do…` : `Importing ${source}…`);
    const request = file
      ? authedFetch(`${IMPORT}${dryRun ? '?dry_run=true' : ''}`, { method: 'POST', headers: { 'content-type': 'application/octet-stream' }, body: file })
        .then(async (response) => {
          const text = await response.text();
          let body = null;
          try { body = JSON.parse(text); } catch { /* not JSON */ }
          if (!response.ok) throw errorFrom(response, body);
          return body;
        })
      : authedCall(IMPORT, { method: 'POST', json: { dry_run: dryRun } });
    if (!dryRun) watch(request);
    try {
      const report = await request;
      replace(message);
      replace(result, reportView(report));
      if (dryRun) {
        say('ok', 'Review the report, then import.', `Dry run of ${source} finished`);
      } else {
        say('ok', `${report.imported} rows imported.`, `Imported ${source}`);
      }
      await refresh();
    } catch (error) {
      const nothing = error instanceof ApiError && error.status >= 400 && error.status < 500 ? '' : ' Nothing of the import was kept.';
      say('error', `${error.message}${nothing}`, dryRun ? 'The dry run failed' : 'The import failed');
    } finally {
      setBusy(false);
    }
  }

  const button = (label, kind, options, extra = {}) => h('button', {
    type: 'button', class: `btn ${options.dryRun ? '' : 'btn-primary'}`.trim(), dataset: { import: kind }, onclick: () => run(options), ...extra,
  }, label);

  replace(main, h('div', { class: 'container' },
    h('div', { class: 'page-head' },
      h('div', {}, h('h1', {}, 'Import the old database'),
        h('p', {}, 'Earlier versions of Omni kept their data in an SQLite file. Import it into PostgreSQL here.'))),
    message,
    progress,
    h('section', { class: 'card', 'aria-labelledby': 'import-detected' },
      h('h2', { id: 'import-detected' }, 'The file on this server'),
      detected,
      h('div', { class: 'actions' },
        button('Dry run', 'detected', { dryRun: true, upload: false }, { id: 'dry-run' }),
        button('Import', 'detected', { dryRun: false, upload: false }, { id: 'import' }))),
    h('section', { class: 'card', 'aria-labelledby': 'import-upload' },
      h('h2', { id: 'import-upload' }, 'Or upload a file'),
      h('label', { for: 'import-file' }, 'SQLite file'),
      fileInput,
      h('p', { class: 'hint', id: 'import-file-size' }, 'Up to 1 GB. The file is sent to the server, imported, then deleted there.'),
      h('div', { class: 'actions' },
        button('Dry run of this file', 'upload', { dryRun: true, upload: true }, { id: 'dry-run-upload' }),
        button('Import this file', 'upload', { dryRun: false, upload: true }, { id: 'import-upload-button' }))),
    result,
    last));
  fileInput.addEventListener('change', () => {
    const file = fileInput.files[0];
    document.getElementById('import-file-size').textContent = file
      ? `${file.name}, ${formatBytes(file.size)}`
      : 'Up to 1 GB. The file is sent to the server, imported, then deleted there.';
  });
  setBusy(false);
  await refresh();
  return () => { stopped = true; };
}
