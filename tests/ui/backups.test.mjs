// Backups page: create → listed with size and date → delete (confirmed) →
// gone. Skipped, with the reason, while the server has no backup API.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { API_KEY, launchBrowser, localStorageLength, openPage, screenshots, signIn, startStack } from './harness.mjs';

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
    await signIn(page);
    await page.goto('/backups');
    await page.getByRole('heading', { name: 'Backups', level: 1 }).waitFor();
    await page.getByRole('button', { name: 'Create backup' }).click();
    const created = page.locator('#backup-message').filter({ hasText: 'Backup created' });
    await created.waitFor({ timeout: 60000 });
    const filename = (await created.innerText()).match(/omni_backup_\d{8}_\d{6}\.sql/)[0];

    const row = page.locator(`tr[data-filename="${filename}"]`);
    await row.waitFor();
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
