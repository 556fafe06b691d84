// Accounts in the browser (issue 15): one sign-in serves every tab and
// survives a browser restart (the cookie jar kept), the theme follows the
// account, signing out signs out every tab, nothing secret is kept in the
// browser or the preferences, and an admin manages accounts on their page.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { ADMIN, API_KEY, createAdmin, launchBrowser, openPage, screenshots, signInAs, startStack, waitFor } from './harness.mjs';

let stack;
let browser;
before(async () => {
  stack = await startStack('accounts');
  await createAdmin(stack);
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await stack?.stop();
});

const theme = (page) => page.evaluate(() => document.documentElement.dataset.theme || null);

/** Everything the page's scripts could read: both storages and document.cookie. */
const readable = (page) => page.evaluate(() => JSON.stringify({ local: { ...localStorage }, session: { ...sessionStorage }, cookie: document.cookie }));

test('signed in once: a second tab and a restarted browser are signed in with the dark theme; sign-out signs out every tab', async () => {
  const { context, page } = await openPage(browser, stack);
  let restarted;
  try {
    await signInAs(page);
    await page.getByRole('button', { name: 'Dark theme' }).click();
    await page.waitForFunction(() => document.documentElement.dataset.theme === 'dark');
    await waitFor(async () => {
      const rows = await stack.query(
        `SELECT p.value FROM omni_user_preferences p JOIN omni_accounts a ON a.id = p.account_id
         WHERE a.username = $1 AND p.key = 'theme'`, [ADMIN.username]);
      return rows[0]?.value === 'dark';
    }, { what: "the admin account's theme row to say dark" });

    // A second tab: no sign-in page, the account's theme.
    const second = await context.newPage();
    await second.goto('/');
    await second.getByRole('heading', { name: 'Dashboard' }).waitFor();
    await second.waitForFunction(() => document.documentElement.dataset.theme === 'dark');

    // The cookie as the server set it, read from the response headers of a sign-in.
    const response = await page.evaluate(async ({ username, password }) => {
      const r = await fetch('/api/v1/auth/login', {
        method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ username, password }),
      });
      return r.status;
    }, ADMIN);
    assert.equal(response, 200);
    const cookies = await context.cookies();
    const session = cookies.find((c) => c.name === 'omni_session');
    assert.ok(session, JSON.stringify(cookies));
    assert.equal(session.httpOnly, true);
    assert.equal(session.sameSite, 'Strict');
    assert.equal(session.path, '/');
    const raw = await fetch(`${stack.base}/api/v1/auth/login`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(ADMIN),
    });
    const setCookie = raw.headers.get('set-cookie');
    assert.match(setCookie, /; HttpOnly(;|$)/);
    assert.match(setCookie, /; SameSite=Strict(;|$)/);

    // The cookie alone cannot change anything (a cross-site form could send it, but not the header).
    const forged = await page.evaluate(async () => (await fetch('/api/v1/backup/create', { method: 'POST' })).status);
    assert.equal(forged, 403);

    // Nothing secret where scripts can read it, nor in the preferences table.
    for (const p of [page, second]) {
      const text = await readable(p);
      assert.ok(!text.includes(ADMIN.password) && !text.includes(API_KEY) && !text.includes('omni_session'), text);
    }
    const leaked = await stack.query(
      'SELECT count(*)::int AS n FROM omni_user_preferences WHERE value LIKE $1 OR value = $2', [`%${ADMIN.password}%`, API_KEY]);
    assert.equal(leaked[0].n, 0);

    // Restart the browser context with its cookie jar: still signed in, still dark.
    const jar = await context.storageState();
    await context.close();
    restarted = await browser.newContext({ baseURL: stack.base, storageState: jar, viewport: { width: 1280, height: 800 } });
    const a = await restarted.newPage();
    await a.goto('/');
    await a.getByRole('heading', { name: 'Dashboard' }).waitFor();
    await a.waitForFunction(() => document.documentElement.dataset.theme === 'dark');
    assert.equal(await a.locator('#account-menu summary').innerText(), ADMIN.username);
    await screenshots(a, 'accounts-signed-in-dark');
    const b = await restarted.newPage();
    await b.goto('/backups');
    await b.getByRole('heading', { name: 'Backups', level: 1 }).waitFor();

    // Sign out in one tab: both are signed out.
    await a.locator('#account-menu summary').click();
    await a.getByRole('menuitem', { name: 'Sign out', exact: true }).click();
    await a.getByRole('heading', { name: 'Sign in' }).waitFor();
    await b.getByRole('heading', { name: 'Sign in' }).waitFor();
    assert.equal(new URL(b.url()).pathname, '/login');
    assert.equal(await b.evaluate(async () => (await fetch('/api/v1/auth/me')).status), 401);
    await b.waitForFunction(() => document.documentElement.dataset.theme !== 'dark');
  } finally {
    await context.close().catch(() => {});
    await restarted?.close();
  }
});

test('an admin creates and disables an account on the Accounts page; the last admin is refused', async () => {
  const { context, page } = await openPage(browser, stack);
  const other = await openPage(browser, stack);
  try {
    await signInAs(page);
    await page.locator('#account-menu summary').click();
    await page.getByRole('menuitem', { name: 'Accounts' }).click();
    await page.getByRole('heading', { name: 'Accounts', level: 1 }).waitFor();
    await page.getByLabel('Username').fill('carol');
    await page.getByLabel('Password', { exact: true }).fill('carol password');
    await page.getByRole('button', { name: 'Create account' }).click();
    await page.locator('#accounts-table tr[data-username="carol"]').waitFor();
    await screenshots(page, 'accounts');

    // Carol signs in elsewhere; she has no Accounts page and her own (empty) preferences.
    // Her dashboard asks for nothing only an admin may read: no 403 behind any card.
    const forbidden = [];
    other.page.on('response', (r) => { if (r.status() === 403) forbidden.push(r.url()); });
    await signInAs(other.page, { username: 'carol', password: 'carol password' });
    assert.notEqual(await theme(other.page), 'dark');
    await other.page.locator('#backups-admin-only').filter({ hasText: 'Backups are managed by an admin.' }).waitFor();
    await other.page.getByRole('heading', { name: 'Services' }).locator('xpath=..').locator('.badge').first().waitFor();
    assert.equal(await other.page.getByRole('link', { name: 'Manage backups' }).count(), 0);
    assert.deepEqual(forbidden, []);

    // Disabling carol ends her session at once.
    await page.getByRole('button', { name: 'Disable carol' }).click();
    await page.locator('#accounts-status').filter({ hasText: 'carol is disabled' }).waitFor();
    await other.page.goto('/backups');
    await other.page.getByRole('heading', { name: 'Sign in' }).waitFor();

    // The last admin cannot be deleted: the server says why.
    page.once('dialog', (dialog) => dialog.accept());
    await page.getByRole('button', { name: 'Delete admin' }).click();
    await page.locator('#accounts-error').filter({ hasText: 'last enabled admin' }).waitFor();
    assert.deepEqual([...page.problems, ...other.page.problems], []);
  } finally {
    await context.close();
    await other.context.close();
  }
});
