// Backups page: create → listed with size and date → delete (confirmed) →
// gone. Skipped, with the reason, while the server has no backup API.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { API_KEY, launchBrowser, localStorageLength, openPage, screenshots, signIn, startStack, waitFor } from './harness.mjs';

let stack;
let browser;
before(async () => {
  stack = await startStack('backups');
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await stack?.stop();
});

/** Null when the backup API answers, else why it is not available. */
async function backupsUnavailable() {
  const response = await stack.api('/api/v1/backup/list', { headers: { 'x-api-key': API_KEY } });
  if (response.status === 200) return null;
  const body = await response.text();
  return `GET /api/v1/backup/list answered ${response.status} ${body.slice(0, 200)}`;
}

/** Signs in, creates a backup with the page's button, and waits for its row. */
async function createFromPage(page) {
  await signIn(page);
  await page.goto('/backups');
  await page.getByRole('heading', { name: 'Backups', level: 1 }).waitFor();
  await page.getByRole('button', { name: 'Create backup' }).click();
  const created = page.locator('#backup-message').filter({ hasText: 'Backup created' });
  await created.waitFor({ timeout: 60000 });
  const filename = (await created.innerText()).match(/omni_backup_\d{8}_\d{6}\.sql/)[0];
  const row = page.locator(`tr[data-filename="${filename}"]`);
  await row.waitFor();
  return { filename, row };
}

test('the backups page renders at both widths', async () => {
  const { context, page } = await openPage(browser, stack);
  try {
    await signIn(page);
    await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Backups' }).click();
    await page.getByRole('heading', { name: 'Backups', level: 1 }).waitFor();
    // Whatever the server offers, the page settles on a list, an empty state or an explanation.
    await page.locator('#backup-table, #no-backups, #backups-unavailable').first().waitFor();
    await screenshots(page, 'backups');
    assert.equal(await localStorageLength(page), 0);
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
  }
});

test('create → listed → delete → gone', async () => {
  assert.equal(await backupsUnavailable(), null, 'the backups API answers');
  const { context, page } = await openPage(browser, stack);
  try {
    const { filename, row } = await createFromPage(page);
    assert.match(await row.locator('td[data-label="Size"]').innerText(), /\d+(\.\d)? (B|KB|MB|GB)/);
    assert.notEqual((await row.locator('td[data-label="Created"]').innerText()).trim(), '—');
    await screenshots(page, 'backups-list');

    // Restore asks first and names the safety backup; cancelling does nothing.
    await row.getByRole('button', { name: `Restore ${filename}` }).click();
    const dialog = page.getByRole('dialog', { name: 'Restore this backup?' });
    await dialog.waitFor();
    assert.match(await dialog.innerText(), /safety backup, named like omni_backup_\d{8}_\d{6}\.sql/);
    await screenshots(page, 'backups-restore-confirm');
    await dialog.getByRole('button', { name: 'Cancel' }).click();
    await dialog.waitFor({ state: 'detached' });

    await row.getByRole('button', { name: `Delete ${filename}` }).click();
    const confirm = page.getByRole('dialog', { name: 'Delete this backup?' });
    await confirm.getByRole('button', { name: 'Delete' }).click();
    await page.locator('#backup-message').filter({ hasText: 'Backup deleted' }).waitFor();
    await row.waitFor({ state: 'detached' });

    const listed = await (await stack.api('/api/v1/backup/list', { headers: { 'x-api-key': API_KEY } })).json();
    assert.ok(!listed.backups.some((b) => b.filename === filename));
    assert.equal(await localStorageLength(page), 0);
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
  }
});

test('an encrypted backup (OMNI_ENCRYPT_LOCAL) is marked so in the list and downloads as the age file it is', async () => {
  // A stack of its own: the variables are read at the start.
  const keys = fs.mkdtempSync(path.join(os.tmpdir(), 'omni-ui-age-'));
  const identity = path.join(keys, 'key.txt');
  try {
    execFileSync('age-keygen', ['-o', identity], { stdio: 'ignore' });
  } catch (error) {
    assert.fail(`age-keygen (Debian's age package) makes this test's key: ${error.message}`);
  }
  const recipient = fs.readFileSync(identity, 'utf8').match(/# public key: (age1\w+)/)[1];
  const sealed = await startStack('backups-sealed', { extraEnv: () => ({ OMNI_ENCRYPT_LOCAL: 'true', OMNI_ENCRYPT_RECIPIENTS: recipient }) });
  const { context, page } = await openPage(browser, sealed);
  try {
    const { filename, row } = await createFromPage(page);
    assert.equal((await row.locator('[data-field="encrypted"]').innerText()).trim(), 'Encrypted');
    await screenshots(page, 'backups-encrypted');

    const [download] = await Promise.all([page.waitForEvent('download'), row.getByRole('button', { name: `Download ${filename}` }).click()]);
    assert.equal(download.suggestedFilename(), `${filename}.age`);
    const bytes = fs.readFileSync(await download.path());
    assert.equal(bytes.subarray(0, 22).toString(), 'age-encryption.org/v1\n', 'the download is the encrypted file');
    // Debian's age opens it with the identity: the dump inside is PostgreSQL's.
    const plain = execFileSync('age', ['-d', '-i', identity], { input: bytes }).toString();
    assert.match(plain, /PostgreSQL database dump/);
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
    await sealed.stop();
    fs.rmSync(keys, { recursive: true, force: true });
  }
});

test('the Actions label of a backup row stays whole at 360 px', async () => {
  await stack.api('/api/v1/backup/create', { method: 'POST', headers: { 'x-api-key': API_KEY } });
  const { context, page } = await openPage(browser, stack, { width: 360, height: 740 });
  try {
    await signIn(page);
    await page.goto('/backups');
    const cell = page.locator('#backup-table td[data-label="Actions"]').first();
    await cell.waitFor();
    // The ::before label is one line: its height is one line of its font.
    const lines = await cell.evaluate((td) => {
      const style = getComputedStyle(td, '::before');
      return { whiteSpace: style.whiteSpace, flexShrink: style.flexShrink };
    });
    assert.deepEqual(lines, { whiteSpace: 'nowrap', flexShrink: '0' });
    await screenshots(page, 'backups-360');
  } finally {
    await context.close();
  }
});

test('point-in-time recovery: the window is shown and a restore to a picked time brings that moment back', async () => {
  const headers = { 'x-api-key': API_KEY };
  const window = await waitFor(async () => {
    const response = await stack.api('/api/v1/backup/window', { headers });
    const body = await response.json();
    return response.status === 200 && body.earliest && body.streaming ? body : null;
  }, { timeout: 120000, what: 'a recoverable window with streaming on' });
  assert.ok(window.base_backups.length >= 1 && window.base_backups[0].verified);

  await stack.query('CREATE TABLE ui_pitr (phase text)');
  await stack.query("INSERT INTO ui_pitr VALUES ('A')");
  // The picker has second resolution: T is a whole second after A, B more than a second after T.
  const [{ t }] = await stack.query("SELECT to_char(date_trunc('second', clock_timestamp() AT TIME ZONE 'UTC') + interval '1 second', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS t");
  await waitFor(async () => (await stack.query('SELECT clock_timestamp() > $1::timestamptz + interval \'1.2 second\' AS ok', [t]))[0].ok, { what: 'T to pass' });
  await stack.query("INSERT INTO ui_pitr VALUES ('B')");
  await waitFor(async () => (await stack.query("SELECT coalesce((SELECT flush_lsn >= pg_current_wal_lsn() FROM pg_stat_replication WHERE application_name = 'omni_wal'), false) AS ok"))[0].ok, { what: 'the streamer to archive B' });

  const { context, page } = await openPage(browser, stack);
  try {
    await signIn(page);
    await page.goto('/backups');
    await page.locator('#pitr-earliest').waitFor();
    assert.match(await page.locator('#pitr-window').innerText(), /restore the database to any moment from .+ to now/);
    await screenshots(page, 'backups-pitr');
    const local = await page.evaluate((iso) => {
      const d = new Date(iso);
      const pad = (n) => String(n).padStart(2, '0');
      return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    }, t);
    await page.locator('#pitr-time').fill(local);
    await page.getByRole('button', { name: 'Restore to this time' }).click();
    const dialog = page.getByRole('dialog', { name: 'Restore the database to this time?' });
    await dialog.waitFor();
    assert.match(await dialog.innerText(), /Everything written after that moment/);
    await dialog.getByRole('button', { name: 'Restore' }).click();
    // The session was opened after T: it is rewound with the data, and the
    // sign-in page says why.
    const notice = page.locator('#login-notice');
    await notice.filter({ hasText: 'Restored to' }).waitFor({ timeout: 300000 });
    assert.match(await notice.innerText(), /Your session began after that moment.*sign in again/);
    await screenshots(page, 'backups-pitr-restored');
    await signIn(page);
    await page.goto('/backups');
    await page.locator('#pitr-earliest').waitFor();
    const rows = await stack.query('SELECT phase FROM ui_pitr ORDER BY phase');
    assert.deepEqual(rows.map((r) => r.phase), ['A']);
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
  }
});

test('without an off-site repository the card says what to set, and its test is off', async () => {
  const window = await (await stack.api('/api/v1/backup/window', { headers: { 'x-api-key': API_KEY } })).json();
  assert.equal(window.offsite, null, 'no off-site window without OMNI_REPOSITORY_URL');
  const { context, page } = await openPage(browser, stack);
  try {
    await signIn(page);
    await page.goto('/backups');
    await page.locator('#offsite-none').waitFor();
    assert.equal(await page.locator('#offsite-window').isHidden(), true);
    assert.match(await page.locator('#offsite-none').innerText(), /OMNI_REPOSITORY_URL/);
    assert.equal(await page.locator('#offsite-test').isDisabled(), true);
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
  }
});

test('off-site copy: the off-site window beside the local one, the state of a directory repository, and "Test connection" passing every step', async () => {
  const offsite = await startStack('offsite', { extraEnv: (cwd) => ({ OMNI_REPOSITORY_URL: `file://${cwd}/offsite` }) });
  const { context, page } = await openPage(browser, offsite);
  try {
    // The base backup and the WAL after it reach the repository: its window is there.
    const window = await waitFor(async () => {
      const response = await offsite.api('/api/v1/backup/window', { headers: { 'x-api-key': API_KEY } });
      const body = await response.json();
      return response.status === 200 && body.offsite && body.offsite.latest ? body : null;
    }, { timeout: 120000, what: 'an off-site window with a latest time' });
    assert.equal(window.offsite.error, null);
    assert.equal(window.offsite.base_backups, 1);
    await signIn(page);
    await page.goto('/backups');
    await page.locator('#offsite-latest').waitFor();
    assert.equal(await page.locator('#offsite-earliest').getAttribute('datetime'), window.offsite.earliest);
    assert.ok(await page.locator('#offsite-latest').getAttribute('datetime') >= window.offsite.latest);
    assert.match(await page.locator('#offsite-window').innerText(), /^Off-site \(file:\/\/.+\/offsite\), a new machine can restore from .+ to .+ \(1 base backup there\)\.$/);
    assert.match(await page.locator('#pitr-window').innerText(), /restore the database to any moment from/, 'the local window is still shown');
    const card = page.locator('#offsite');
    await card.locator('[data-field="state"]').waitFor();
    assert.match(await card.locator('[data-field="url"]').innerText(), /^file:\/\/.+\/offsite$/);
    assert.match(await card.locator('[data-field="retention"]').innerText(), /older than OMNI_REPOSITORY_WINDOW/);
    await page.getByRole('button', { name: 'Test connection' }).click();
    await page.locator('#offsite-test-ok').waitFor({ timeout: 60000 });
    const steps = await page.locator('#offsite-steps li').evaluateAll((items) => items.map((li) => [li.dataset.step, li.dataset.ok]));
    assert.deepEqual(steps, [['write', 'true'], ['read', 'true'], ['list', 'true'], ['delete', 'true']]);
    await screenshots(page, 'backups-offsite');
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
    await offsite.stop();
  }
});

/** Inverts 64 bytes in the middle of `file`, in place. */
function flipBytes(file) {
  const bytes = fs.readFileSync(file);
  assert.ok(bytes.length > 128, `${file} is too small to damage in its middle`);
  const middle = Math.floor(bytes.length / 2);
  for (let i = middle; i < middle + 64; i += 1) bytes[i] = ~bytes[i] & 0xff;
  fs.writeFileSync(file, bytes);
}

test('off-site drill: "Last verified off-site" names the base backup it restored, then the damaged object in a red alert', async () => {
  const drilled = await startStack('drill', {
    extraEnv: (cwd) => ({ OMNI_REPOSITORY_URL: `file://${cwd}/offsite`, OMNI_REPOSITORY_WAL_INTERVAL: '1s', OMNI_BACKUP_DRILL_INTERVAL: '3s' }),
  });
  const { context, page } = await openPage(browser, drilled, { strict: true });
  const lastVerified = async () => (await (await drilled.api('/gateway/status', { headers: { accept: 'application/json' } })).json()).repository?.last_verified;
  try {
    // The first drills may run before the base backup's manifest reaches the repository, and fail saying so.
    const passed = await waitFor(async () => {
      const v = await lastVerified();
      return v && v.ok === true ? v : null;
    }, { timeout: 240000, what: 'an off-site drill that passed' });
    assert.ok(passed.base_backup, JSON.stringify(passed));
    await signIn(page);
    await page.goto('/backups');
    const field = page.locator('#offsite [data-field="last-verified"]');
    await field.waitFor();
    assert.equal(await field.getAttribute('data-ok'), 'true');
    assert.equal(await field.getAttribute('data-manifest-only'), 'false');
    const shown = await field.innerText();
    assert.match(shown, /^passed on .+: base backup /);
    assert.ok(shown.includes(`base backup ${passed.base_backup} of file://`), shown);
    assert.equal(await field.locator('time').getAttribute('datetime'), passed.at);
    await screenshots(page, 'backups-offsite-verified');

    // Damaged in the store itself: the next drill names the object.
    const offsite = path.join(drilled.cwd, 'offsite');
    const generation = fs.readdirSync(offsite).find((name) => fs.existsSync(path.join(offsite, name, 'base', passed.base_backup, 'base.tar.lz4')));
    assert.ok(generation, `base/${passed.base_backup}/base.tar.lz4 under ${offsite}`);
    const object = `${generation}/base/${passed.base_backup}/base.tar.lz4`;
    flipBytes(path.join(offsite, object));
    const failed = await waitFor(async () => {
      const v = await lastVerified();
      return v && v.ok === false && v.damaged_object ? v : null;
    }, { timeout: 240000, what: 'an off-site drill that names a damaged object' });
    assert.equal(failed.damaged_object, object, JSON.stringify(failed));
    const health = await drilled.api('/health');
    const healthText = await health.text();
    assert.equal(health.status, 200, `a damaged off-site copy does not fail /health: ${healthText}`);
    assert.ok(JSON.stringify(JSON.parse(healthText).degraded).includes(object), healthText);

    await page.reload();
    const alert = page.locator('#offsite').getByRole('alert').filter({ hasText: object });
    await alert.waitFor();
    assert.equal(await alert.getAttribute('data-field'), 'last-verified');
    assert.equal(await alert.getAttribute('data-ok'), 'false');
    assert.equal(await alert.locator('[data-field="damaged-object"]').innerText(), object);
    const said = await alert.innerText();
    // The title line is the date of the failure; the error is a sentence of its own.
    assert.match(said, /^FAILED on [^\n]+\nThe object \S+ is damaged\. /);
    assert.match(said, /\. The last drill that passed was on .+\.$/);
    assert.equal(await alert.locator('time').last().getAttribute('datetime'), failed.last_success);
    await screenshots(page, 'backups-offsite-damaged');
    // At 360 px the alert is read under its label, across the card, from the left.
    await page.setViewportSize({ width: 360, height: 740 });
    const [alertBox, cardBox] = [await alert.boundingBox(), await page.locator('#offsite').boundingBox()];
    assert.ok(alertBox.width > cardBox.width * 0.8, `the alert is ${alertBox.width} px wide in a card of ${cardBox.width} px`);
    assert.equal(await alert.evaluate((dd) => getComputedStyle(dd).textAlign), 'left');
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
    await drilled.stop();
  }
});
