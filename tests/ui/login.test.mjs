// Signing in: the right key reaches the dashboard, a wrong one shows the
// API's reason and stays on the login page; client-side routes survive a reload.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { API_KEY, launchBrowser, localStorageLength, openPage, screenshots, signIn, startStack } from './harness.mjs';

let stack;
let browser;
before(async () => {
  stack = await startStack('login');
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await stack?.stop();
});

test('a wrong key shows the API error and does not navigate', async () => {
  const { context, page } = await openPage(browser, stack);
  try {
    await page.goto('/login');
    await page.getByRole('heading', { name: 'Sign in' }).waitFor();
    await page.getByLabel('API key', { exact: true }).fill('sk-omni-wrong-key-000000000000');
    await page.getByRole('button', { name: 'Sign in' }).click();
    const error = page.locator('#login-error');
    await error.filter({ hasText: 'does not match the API key' }).waitFor();
    assert.equal(new URL(page.url()).pathname, '/login');
    assert.equal(await page.getByLabel('API key', { exact: true }).getAttribute('aria-invalid'), 'true');
    await screenshots(page, 'login-error');
    assert.equal(await localStorageLength(page), 0);
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
  }
});

test('the right key leads to the dashboard and is kept for the tab session only', async () => {
  const { context, page } = await openPage(browser, stack);
  try {
    await page.goto('/login');
    await screenshots(page, 'login');
    await signIn(page, API_KEY);
    assert.equal(new URL(page.url()).pathname, '/');
    await page.getByRole('heading', { name: 'Services' }).waitFor();
    await screenshots(page, 'dashboard');

    // The key is held by the preferences API under this tab's session id.
    const sessionId = await page.evaluate(() => sessionStorage.getItem('omni.sessionId'));
    const stored = await stack.query(
      'SELECT value FROM omni_user_preferences WHERE session_id::text = $1 AND key = $2', [sessionId, 'api_key']);
    assert.deepEqual(stored.map((r) => r.value), [API_KEY]);

    // A client-side route survives a reload (the server answers index.html).
    await page.goto('/backups');
    await page.getByRole('heading', { name: 'Backups', level: 1 }).waitFor();
    await page.reload();
    await page.getByRole('heading', { name: 'Backups', level: 1 }).waitFor();

    // Keyboard: Tab reaches the navigation with a visible focus ring.
    await page.goto('/');
    await page.getByRole('heading', { name: 'Dashboard' }).waitFor();
    await page.keyboard.press('Tab');
    await page.keyboard.press('Tab');
    const outline = await page.evaluate(() => getComputedStyle(document.activeElement).outlineStyle);
    assert.notEqual(outline, 'none');

    // Signing out forgets the key for this session.
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByRole('heading', { name: 'Sign in' }).waitFor();
    const after = await stack.query(
      'SELECT count(*)::int AS n FROM omni_user_preferences WHERE session_id::text = $1 AND key = $2', [sessionId, 'api_key']);
    assert.equal(after[0].n, 0);
    assert.equal(await localStorageLength(page), 0);
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
  }
});

test('signing in works with the keyboard alone', async () => {
  const { context, page } = await openPage(browser, stack);
  try {
    await page.goto('/login');
    await page.getByRole('heading', { name: 'Sign in' }).waitFor();
    // The key field has focus on arrival; Enter submits.
    await page.waitForFunction(() => document.activeElement && document.activeElement.id === 'api-key');
    await page.keyboard.type(API_KEY);
    await page.keyboard.press('Enter');
    await page.getByRole('heading', { name: 'Dashboard' }).waitFor();
    assert.equal(await localStorageLength(page), 0);
  } finally {
    await context.close();
  }
});
