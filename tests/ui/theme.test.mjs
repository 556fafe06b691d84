// The theme is a preference of the tab's session: it survives reloads, it is
// stored in omni_user_preferences under that session, and another session
// (another browser context) does not see it.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { launchBrowser, localStorageLength, openPage, screenshots, signIn, startStack, waitFor } from './harness.mjs';

let stack;
let browser;
before(async () => {
  stack = await startStack('theme');
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await stack?.stop();
});

const theme = (page) => page.evaluate(() => document.documentElement.dataset.theme || null);

test('the theme stays after a reload, is stored for the session, and is not seen by another session', async () => {
  const first = await openPage(browser, stack);
  const second = await openPage(browser, stack);
  try {
    const { page } = first;
    await signIn(page);
    assert.notEqual(await theme(page), 'dark');
    await page.getByRole('button', { name: 'Dark theme' }).click();
    await page.waitForFunction(() => document.documentElement.dataset.theme === 'dark');
    await page.getByRole('button', { name: 'Light theme' }).waitFor();

    const sessionId = await page.evaluate(() => sessionStorage.getItem('omni.sessionId'));
    const rows = await waitFor(async () => {
      const found = await stack.query(
        'SELECT value FROM omni_user_preferences WHERE session_id::text = $1 AND key = $2', [sessionId, 'theme']);
      return found.length === 1 && found;
    }, { what: 'the theme row in omni_user_preferences' });
    assert.equal(rows[0].value, 'dark');

    await page.reload();
    await page.getByRole('heading', { name: 'Dashboard' }).waitFor();
    assert.equal(await theme(page), 'dark');
    await screenshots(page, 'dashboard-dark');

    // Without the tab's cache the server alone brings the theme back.
    await page.evaluate(() => sessionStorage.removeItem('omni.theme'));
    await page.reload();
    await page.waitForFunction(() => document.documentElement.dataset.theme === 'dark');

    // Another context is another session: light theme, and no row for it.
    const other = second.page;
    // Preferences are read once per page load, as a list (no 404 per missing key).
    const themeLookup = other.waitForResponse((r) => new URL(r.url()).pathname === '/api/v1/preferences');
    await other.goto('/login');
    await other.getByRole('heading', { name: 'Sign in' }).waitFor();
    const lookup = await themeLookup;
    assert.equal(lookup.status(), 200);
    assert.deepEqual(await lookup.json(), []);
    await other.evaluate(() => new Promise((resolve) => requestAnimationFrame(resolve)));
    assert.notEqual(await theme(other), 'dark');
    const otherId = await other.evaluate(() => sessionStorage.getItem('omni.sessionId'));
    assert.ok(otherId && otherId !== sessionId);
    const response = await stack.api('/api/v1/preferences/theme', { headers: { 'x-session-id': otherId } });
    assert.equal(response.status, 404);

    // Switching back is stored too.
    await page.getByRole('button', { name: 'Light theme' }).click();
    await page.waitForFunction(() => document.documentElement.dataset.theme === 'light');
    await waitFor(async () => {
      const found = await stack.query(
        'SELECT value FROM omni_user_preferences WHERE session_id::text = $1 AND key = $2', [sessionId, 'theme']);
      return found[0]?.value === 'light';
    }, { what: 'the theme row to say light' });

    assert.equal(await localStorageLength(page), 0);
    assert.equal(await localStorageLength(other), 0);
    assert.deepEqual([...page.problems, ...other.problems], []);
  } finally {
    await first.context.close();
    await second.context.close();
  }
});

// The Content-Security-Policy allows no inline script or style: every page of
// the UI must render without a single violation, and the theme must still be
// applied before the first paint by js/boot.js.
test('every page renders under the Content-Security-Policy without a violation', async () => {
  const { context, page } = await openPage(browser, stack);
  try {
    await page.addInitScript(() => {
      window.__cspViolations = [];
      document.addEventListener('securitypolicyviolation', (e) => {
        window.__cspViolations.push(`${e.violatedDirective} blocked ${e.blockedURI || 'inline'} at ${e.sourceFile || '?'}:${e.lineNumber}`);
      });
    });
    const consoleViolations = [];
    page.on('console', (m) => { if (/Content.Security.Policy/i.test(m.text())) consoleViolations.push(m.text()); });
    const first = await page.goto('/login');
    const csp = first.headers()['content-security-policy'] || '';
    assert.match(csp, /script-src 'self'/);
    assert.match(csp, /frame-ancestors 'none'/);
    assert.doesNotMatch(csp, /unsafe-inline/);
    assert.equal(first.headers()['x-frame-options'], 'DENY');
    await signIn(page);
    // The next page load asks the server, which must have the theme by then.
    const stored = page.waitForResponse((r) => new URL(r.url()).pathname === '/api/v1/preferences'
      && r.request().method() === 'POST');
    await page.getByRole('button', { name: 'Dark theme' }).click();
    await page.waitForFunction(() => document.documentElement.dataset.theme === 'dark');
    assert.ok((await stored).ok());
    for (const [path, heading] of [['/', 'Dashboard'], ['/status', 'Status'], ['/logs', 'Logs'], ['/backups', 'Backups'],
      ['/import', 'Import'], ['/accounts', 'Accounts']]) {
      await page.goto(path);
      await page.getByRole('heading', { name: heading, exact: false }).first().waitFor();
      // js/boot.js set the cached theme before anything else ran.
      assert.equal(await theme(page), 'dark', path);
      await page.evaluate(() => new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve))));
      const violations = await page.evaluate(() => window.__cspViolations);
      assert.deepEqual(violations, [], `${path}: ${violations.join('; ')}`);
    }
    assert.deepEqual(consoleViolations, []);
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
  }
});
