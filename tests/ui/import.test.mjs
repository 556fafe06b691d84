// Import of the old SQLite database: the dashboard's notice → the import
// page → a dry run whose report writes nothing → Import, confirmed → the
// report, and the rows in PostgreSQL; then the same with a file uploaded
// from the browser. The SQLite files are built here, with Python's sqlite3.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { launchBrowser, localStorageLength, openPage, screenshots, signIn, startStack } from './harness.mjs';

let stack;
let browser;
let scratch;
before(async () => {
  stack = await startStack('import');
  browser = await launchBrowser();
  scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'omni-ui-import-'));
});
after(async () => {
  await browser?.close();
  await stack?.stop();
  if (scratch) fs.rmSync(scratch, { recursive: true, force: true });
});

/** An old-era SQLite file: `instances` instances named `${prefix}-N`, each with a user and a trace with one payload, plus an orphan user. */
function oldDatabase(file, prefix, firstId) {
  const script = `
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
prefix, first = sys.argv[2], int(sys.argv[3])
db.executescript("""
CREATE TABLE instance_configs (id INTEGER PRIMARY KEY, name VARCHAR NOT NULL UNIQUE, channel_type VARCHAR, webhook_base64 BOOLEAN, created_at DATETIME);
CREATE TABLE users (id VARCHAR PRIMARY KEY, phone_number VARCHAR NOT NULL, whatsapp_jid VARCHAR NOT NULL, instance_name VARCHAR NOT NULL, created_at DATETIME);
CREATE TABLE message_traces (trace_id VARCHAR PRIMARY KEY, instance_name VARCHAR, has_media BOOLEAN, received_at DATETIME, status VARCHAR);
CREATE TABLE trace_payloads (id INTEGER PRIMARY KEY, trace_id VARCHAR, stage VARCHAR, payload_compressed TEXT, timestamp DATETIME);
""")
for i in range(3):
    n = first + i
    db.execute("INSERT INTO instance_configs VALUES (?, ?, 'whatsapp', '1', '2024-01-01 00:00:00')", (n, f"{prefix}-{n}"))
    db.execute("INSERT INTO users VALUES (?, ?, ?, ?, '2024-01-01 00:00:00.5')", (f"{prefix}-user-{n}", f"+1{n}", f"{n}@jid", f"{prefix}-{n}"))
    db.execute("INSERT INTO message_traces VALUES (?, ?, ?, '2024-01-02 00:00:00', 'completed')", (f"{prefix}-trace-{n}", f"{prefix}-{n}", i % 2))
    db.execute("INSERT INTO trace_payloads VALUES (?, ?, 'webhook_received', 'eJyrVkrLz1eyUkpKLFKqBQAdegQ0', '2024-01-02 00:00:00.25')", (n, f"{prefix}-trace-{n}"))
db.execute("INSERT INTO users VALUES (?, '+19', '9@jid', 'deleted-instance', '2024-01-01 00:00:00')", (f"{prefix}-orphan",))
db.commit()
`;
  execFileSync('python3', ['-c', script, file, prefix, String(firstId)]);
}

async function count(table) {
  return Number((await stack.query(`SELECT count(*) AS n FROM ${table}`))[0].n);
}

test('dashboard notice → dry run → confirm → imported, and an uploaded file', async () => {
  fs.mkdirSync(path.join(stack.cwd, 'data'), { recursive: true });
  const detected = path.join(stack.cwd, 'data', 'automagik-omni.db');
  oldDatabase(detected, 'old', 10);
  const { context, page } = await openPage(browser, stack);
  try {
    await signIn(page);
    const notice = page.locator('#migration-notice');
    await notice.getByText('An old database was found').waitFor();
    assert.match(await notice.innerText(), /automagik-omni\.db/);
    await screenshots(page, 'import-dashboard-notice');
    await notice.getByRole('link', { name: 'Review and import it' }).click();
    await page.getByRole('heading', { name: 'Import the old database', level: 1 }).waitFor();
    assert.match(await page.locator('#detected-path').innerText(), /data\/automagik-omni\.db$/);

    // Dry run: a report, and nothing written.
    await page.getByRole('button', { name: 'Dry run', exact: true }).click();
    const report = page.locator('#import-report');
    await report.getByRole('heading', { name: 'Dry run: nothing was written' }).waitFor({ timeout: 60000 });
    assert.equal((await report.locator('tr[data-table="omni_users"] td[data-label="Imported"]').innerText()).trim(), '3');
    assert.equal((await report.locator('tr[data-table="omni_users"] td[data-label="Skipped"]').innerText()).trim(), '1');
    assert.match(await report.locator('.notes').innerText(), /orphan.*old-orphan/);
    assert.equal(await count('omni_users'), 0, 'the dry run wrote nothing');
    await screenshots(page, 'import-dry-run');

    // Import: asks first, says what happens, then reports.
    await page.getByRole('button', { name: 'Import', exact: true }).click();
    const dialog = page.getByRole('dialog', { name: 'Import this database?' });
    await dialog.waitFor();
    assert.match(await dialog.innerText(), /safety backup/);
    assert.match(await dialog.innerText(), /one transaction/);
    await screenshots(page, 'import-confirm');
    await dialog.getByRole('button', { name: 'Import' }).click();
    await page.locator('#import-message').getByText('Imported').first().waitFor({ timeout: 120000 });
    await report.getByRole('heading', { name: 'Imported' }).waitFor();
    assert.match(await report.locator('.summary').innerText(), /13 rows in the file: 12 imported/);
    assert.match(await report.innerText(), /omni_backup_\d{8}_\d{6}\.sql/, 'names the safety backup');
    assert.equal(await count('omni_users'), 3);
    assert.equal(await count('omni_trace_payloads'), 3);
    await screenshots(page, 'import-done');
    await page.reload();
    await page.locator('#last-import-report').waitFor();

    // The notice is gone once the file found was imported.
    await page.goto('/');
    await page.getByRole('heading', { name: 'Dashboard' }).waitFor();
    await page.locator('#card-backups').waitFor();
    assert.equal(await page.locator('#migration-notice').innerText(), '');

    // A file from the browser: uploaded as the request body.
    const upload = path.join(scratch, 'elsewhere.db');
    oldDatabase(upload, 'up', 20);
    await page.goto('/import');
    await page.getByLabel('SQLite file').setInputFiles(upload);
    await page.getByRole('button', { name: 'Dry run of this file' }).click();
    await report.getByRole('heading', { name: 'Dry run: nothing was written' }).waitFor({ timeout: 60000 });
    assert.equal(await count('omni_instance_configs'), 3);
    await page.getByRole('button', { name: 'Import this file' }).click();
    await page.getByRole('dialog', { name: 'Import this database?' }).getByRole('button', { name: 'Import' }).click();
    await report.getByRole('heading', { name: 'Imported' }).waitFor({ timeout: 120000 });
    assert.equal(await count('omni_instance_configs'), 6);

    // Not a database: the server's reason, nothing written.
    const junk = path.join(scratch, 'notes.txt');
    fs.writeFileSync(junk, 'not a database\n');
    await page.getByLabel('SQLite file').setInputFiles(junk);
    await page.getByRole('button', { name: 'Dry run of this file' }).click();
    await page.locator('#import-message').getByText(/not an SQLite database/).waitFor();
    assert.equal(await count('omni_instance_configs'), 6);

    assert.equal(await localStorageLength(page), 0);
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
  }
});
