// Signing in: with the API key ("Use an API key instead") or an account; a
// wrong one shows the API's reason and stays on the login page; nothing
// typed is kept in the browser or in the preferences; client-side routes
// survive a reload.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { ADMIN, API_KEY, createAdmin, launchBrowser, localStorageLength, openPage, screenshots, signIn, startStack } from './harness.mjs';

let stack;
let browser;
before(async () => {
  stack = await startStack('login');
  await createAdmin(stack);
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await stack?.stop();
});

test('a wrong key or password shows the API error and does not navigate', async () => {
  const { context, page } = await openPage(browser, stack);
  try {
    await page.goto('/login');
    await page.getByRole('heading', { name: 'Sign in' }).waitFor();
    await page.getByLabel('Username').fill(ADMIN.username);
    await page.getByLabel('Password').fill('not the password');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.locator('#login-error').filter({ hasText: 'The username or password is wrong' }).waitFor();
    assert.equal(await page.getByLabel('Password').getAttribute('aria-invalid'), 'true');

    await page.getByRole('button', { name: 'Use an API key instead' }).click();
    await page.getByLabel('API key', { exact: true }).fill('sk-omni-wrong-key-000000000000');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.locator('#login-error').filter({ hasText: 'The API key is wrong' }).waitFor();
    assert.equal(new URL(page.url()).pathname, '/login');
    assert.equal(await page.getByLabel('API key', { exact: true }).getAttribute('aria-invalid'), 'true');
    await screenshots(page, 'login-error');
    assert.equal(await localStorageLength(page), 0);
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
  }
});

test('the right key leads to the dashboard through a session cookie; the key is kept nowhere', async () => {
  const { context, page } = await openPage(browser, stack);
  try {
    await page.goto('/login');
    await screenshots(page, 'login');
    await signIn(page, API_KEY);
    assert.equal(new URL(page.url()).pathname, '/');
    await page.getByRole('heading', { name: 'Services' }).waitFor();
    await screenshots(page, 'dashboard');

    // The session is an HttpOnly cookie: invisible to scripts; no key in any storage or preference.
    assert.equal(await page.evaluate(() => document.cookie), '');
    const cookies = await context.cookies();
    const session = cookies.find((c) => c.name === 'omni_session');
    assert.ok(session && session.httpOnly && session.sameSite === 'Strict', JSON.stringify(cookies));
    const stored = await page.evaluate(() => JSON.stringify({ ...localStorage }) + JSON.stringify({ ...sessionStorage }));
    assert.ok(!stored.includes(API_KEY), stored);
    const rows = await stack.query('SELECT count(*)::int AS n FROM omni_user_preferences WHERE value = $1', [API_KEY]);
    assert.equal(rows[0].n, 0);

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

    // Signing out ends the session on the server too.
    await page.locator('#account-menu summary').click();
    await page.getByRole('menuitem', { name: 'Sign out', exact: true }).click();
    await page.getByRole('heading', { name: 'Sign in' }).waitFor();
    const ended = await page.evaluate(async () => (await fetch('/api/v1/auth/me')).status);
    assert.equal(ended, 401);
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
    // The username field has focus on arrival; Tab goes to the password; Enter submits.
    await page.waitForFunction(() => document.activeElement && document.activeElement.id === 'username');
    await page.keyboard.type(ADMIN.username);
    await page.keyboard.press('Tab');
    await page.keyboard.type(ADMIN.password);
    await page.keyboard.press('Enter');
    await page.getByRole('heading', { name: 'Dashboard' }).waitFor();
    assert.equal(await localStorageLength(page), 0);
  } finally {
    await context.close();
  }
});
