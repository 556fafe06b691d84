// The install as shipped: omni-gateway and omni-api alone in an empty
// directory, started from there without OMNI_UI_DIR, so every page, script
// and style comes from the UI built into omni-api. A first visit shows the
// sign-in page without a console error (no 401 for "who am I"), and every
// page of the UI then opens with no console error, no failed request and no
// error answer.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { launchBrowser, openPage, signIn, startStack, UI_DIR } from './harness.mjs';

let stack;
let browser;
before(async () => {
  stack = await startStack('install', { installed: true });
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await stack?.stop();
});

// Every route of ui-dist/js/app.js, with the heading it shows to the API key.
const PAGES = [
  ['/', 'Dashboard'],
  ['/status', 'Service status'],
  ['/logs', 'Logs'],
  ['/backups', 'Backups'],
  ['/setup', /storage/i],
  ['/import', 'Import the old database'],
  ['/accounts', 'Accounts'],
  ['/no-such-page', 'Page not found'],
];

async function settled(page, heading) {
  await page.getByRole('heading', { level: 1, name: heading }).waitFor();
  // Each page shows `.loading` until its data has arrived.
  await page.waitForFunction(() => document.querySelectorAll('.loading').length === 0);
}

test('the working directory holds the two binaries and the data, no UI files', () => {
  const entries = fs.readdirSync(stack.cwd).sort();
  assert.deepEqual(entries.filter((e) => e !== 'data'), ['omni-api', 'omni-gateway']);
});

test('a first visit shows the sign-in page with no console error', async () => {
  const { context, page } = await openPage(browser, stack, { strict: true });
  try {
    await page.goto('/');
    await page.waitForURL('**/login');
    await settled(page, 'Sign in');
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
  }
});

test('every page opens with no console error and no failed request', async () => {
  const { context, page } = await openPage(browser, stack, { strict: true });
  try {
    await signIn(page);
    for (const [route, heading] of PAGES) {
      const response = await page.goto(route);
      assert.equal(response.status(), 200, route);
      assert.equal(await response.text(), fs.readFileSync(path.join(UI_DIR, 'index.html'), 'utf8'), `${route} is the built-in index.html`);
      await settled(page, heading);
      assert.deepEqual(page.problems, [], `on ${route}`);
    }
    // The scripts and styles the pages loaded are ui-dist's, byte for byte.
    for (const file of ['js/app.js', 'js/session.js', 'styles.css']) {
      const served = await page.evaluate(async (p) => (await fetch(p)).text(), `/${file}`);
      assert.equal(served, fs.readFileSync(path.join(UI_DIR, file), 'utf8'), file);
    }
  } finally {
    await context.close();
  }
});
