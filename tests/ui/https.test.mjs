// HTTPS in the browser (issue 29). A gateway serving a certificate from a
// test CA that Chromium trusts (an NSS database, not an ignored error)
// loads the UI, signs in with a `Secure` `__Host-` cookie, speaks HTTP/2,
// and streams the live logs to 8 tabs at once over its one connection. The
// same 8 tabs over plain HTTP/1.1 show why that matters: Chromium opens 6
// connections to an origin, so the 7th tab waits until one closes.
// A gateway still waiting for its first ACME certificate says so on the
// Status page.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import {
  API_KEY, createAdmin, freePort, launchBrowser, makeTestCA, screenshots, signInAs, startStack, waitFor,
} from './harness.mjs';

/** Tabs following the live logs: more than HTTP/1.1's 6 connections per origin. */
const TABS = 8;
/** Chromium's limit of HTTP/1.1 connections to one origin. */
const H1_CONNECTIONS = 6;

let ca;
let browser;
/** HTTPS with the test CA's certificate, and plain HTTP: both with an admin account. */
let secure;
let plain;
before(async () => {
  ca = makeTestCA(fs.mkdtempSync(path.join(os.tmpdir(), 'omni-ui-ca-')));
  browser = await launchBrowser({ trust: ca.caFile });
  secure = await startStack('https', { https: ca });
  await createAdmin(secure);
  plain = await startStack('http1');
  await createAdmin(plain);
});
after(async () => {
  await browser?.close();
  await secure?.stop();
  await plain?.stop();
  if (ca) fs.rmSync(path.dirname(ca.caFile), { recursive: true, force: true });
});

/** The newest log line number the gateway has (0 for none). */
async function newestSeq(stack) {
  const response = await stack.api('/gateway/logs?limit=1', { headers: { 'x-api-key': API_KEY } });
  assert.equal(response.status, 200);
  const { lines } = await response.json();
  return lines.length ? lines[lines.length - 1].seq : 0;
}

/** Makes the worker log a line no tab has seen ("account created"); returns the username. */
async function logSomething(stack) {
  const username = `tab-${Date.now()}`;
  const created = await stack.api('/api/v1/accounts', {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': API_KEY },
    body: JSON.stringify({ username, password: 'correct horse battery', role: 'user' }),
  });
  assert.equal(created.status, 201, await created.text());
  return username;
}

/** Resolves when `page` shows a line after `seq` containing `text`. */
function shows(page, seq, text, timeout) {
  return page.waitForFunction(([after, wanted]) => [...document.querySelectorAll('#log-lines .log-line')]
    .some((r) => Number(r.dataset.seq) > after && r.textContent.includes(wanted)), [seq, text], { timeout });
}

/** Opens /logs in a new tab of `context` and waits until its stream is live. */
async function logsTab(context) {
  const page = await context.newPage();
  page.setDefaultTimeout(15000);
  await page.goto('/logs');
  await page.locator('#log-live').filter({ hasText: 'Live' }).waitFor();
  await page.locator('#log-lines .log-line').first().waitFor();
  return page;
}

/** A signed-in browser context on `stack` (the session cookie serves every tab). */
async function signedIn(stack) {
  const context = await browser.newContext({ baseURL: stack.base, viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(15000);
  const problems = [];
  page.on('pageerror', (error) => problems.push(error.message));
  await signInAs(page);
  return { context, page, problems };
}

test('over HTTPS the UI signs in with a Secure __Host- cookie, speaks h2, and streams the logs to 8 tabs at once', { timeout: 180000 }, async () => {
  const stack = secure;
  assert.match(stack.base, /^https:/);
  const { context, page, problems } = await signedIn(stack);
  try {
    const protocol = await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
    assert.equal(protocol, 'h2', 'the page came over HTTP/2');
    assert.equal(await page.evaluate(() => window.isSecureContext), true);

    const cdp = await context.newCDPSession(page);
    await cdp.send('Network.enable');
    const { cookies } = await cdp.send('Network.getCookies', { urls: [stack.base] });
    const session = cookies.filter((c) => c.name.includes('omni_session'));
    assert.equal(session.length, 1, `one session cookie: ${JSON.stringify(cookies)}`);
    assert.equal(session[0].name, '__Host-omni_session');
    assert.equal(session[0].secure, true);
    assert.equal(session[0].httpOnly, true);
    assert.equal(session[0].path, '/');
    assert.equal(session[0].sameSite, 'Strict');
    await cdp.detach();

    // The signed-in tab becomes the first logs tab; 7 more join it.
    await page.goto('/logs');
    await page.locator('#log-live').filter({ hasText: 'Live' }).waitFor();
    const tabs = [page];
    while (tabs.length < TABS) tabs.push(await logsTab(context));
    for (const tab of tabs) {
      assert.equal(await tab.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol), 'h2');
    }

    const seq = await newestSeq(stack);
    const username = await logSomething(stack);
    // Every tab, the 7th and 8th included, gets the new line on its open stream.
    const seen = await Promise.allSettled(tabs.map((tab) => shows(tab, seq, 'account created', 10000)));
    const missing = seen.map((s, i) => (s.status === 'fulfilled' ? null : i + 1)).filter(Boolean);
    assert.deepEqual(missing, [], `tabs without the new line (of ${TABS}): ${missing.join(', ')}`);
    assert.ok(username);
    for (const tab of tabs) assert.equal(await tab.locator('#log-live').innerText(), 'Live');
    await screenshots(tabs[TABS - 1], 'logs-https');
    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});

test('over plain HTTP/1.1 the same tabs queue: the 7th gets nothing while 6 streams are open', { timeout: 180000 }, async () => {
  const stack = plain;
  const { context, page } = await signedIn(stack);
  try {
    assert.equal(await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol), 'http/1.1');
    await page.goto('/logs');
    await page.locator('#log-live').filter({ hasText: 'Live' }).waitFor();
    const tabs = [page];
    while (tabs.length < H1_CONNECTIONS) tabs.push(await logsTab(context));

    // The 7th tab: its page cannot even load while 6 connections hold streams.
    const seventh = await context.newPage();
    let settled = false;
    const loading = seventh.goto('/logs', { timeout: 30000 }).catch((error) => error).finally(() => { settled = true; });
    const seq = await newestSeq(stack);
    await logSomething(stack);
    await Promise.all(tabs.map((tab) => shows(tab, seq, 'account created', 10000)));
    // The 6 open tabs have the line; the 7th has had as long and has not even
    // its page (nothing committed: asking it anything would wait for the load).
    assert.equal(settled, false, 'the 7th tab is still waiting for a connection');
    assert.equal(seventh.url(), 'about:blank');

    // One tab closes, one connection frees: the 7th loads and shows the line.
    await tabs.pop().close();
    const loaded = await loading;
    assert.ok(!(loaded instanceof Error), `the 7th tab loads once a connection is free: ${loaded}`);
    await seventh.locator('#log-live').filter({ hasText: 'Live' }).waitFor();
    await shows(seventh, seq, 'account created', 10000);
  } finally {
    await context.close();
  }
});

test('until ACME delivers, the Status page says loudly that the certificate is self-signed, with the last ACME error', { timeout: 240000 }, async () => {
  // A directory on a port nothing listens on: every attempt fails at once.
  const directory = `https://127.0.0.1:${await freePort()}/directory`;
  const stack = await startStack('acme-down', {
    https: { insecure: true },
    extraEnv: () => ({ OMNI_TLS_DOMAINS: 'omni.test', OMNI_ACME_DIRECTORY: directory }),
  });
  let context;
  try {
    const tls = await waitFor(async () => {
      const doc = await (await stack.api('/gateway/status')).json();
      return doc.tls?.last_error ? doc.tls : null;
    }, { timeout: 30000, what: 'the first ACME attempt to fail' });
    assert.equal(tls.source, 'acme');
    assert.match(tls.state, /^self-signed/);
    await createAdmin(stack);
    // The browser is told to accept the stand-in: no CA vouches for it.
    context = await browser.newContext({ baseURL: stack.base, viewport: { width: 1280, height: 800 }, ignoreHTTPSErrors: true });
    const page = await context.newPage();
    page.setDefaultTimeout(15000);
    await signInAs(page);
    await page.goto('/status');
    const card = page.locator('[data-component="tls"]');
    await card.waitFor();
    assert.equal(await card.getAttribute('data-self-signed'), 'true');
    assert.equal(await card.locator('[data-field="tls-state"]').innerText(), 'self-signed');
    const alert = card.getByRole('alert');
    assert.match(await alert.innerText(), /Self-signed: waiting for the first certificate/);
    assert.match(await alert.innerText(), /omni\.test/);
    assert.match(await card.locator('[data-field="subject"]').innerText(), /\S/);
    assert.match(await card.locator('[data-field="expires"]').innerText(), /\(in \d+d \d+h\)/);
    const shownError = await card.locator('[data-field="acme-error"]').innerText();
    assert.notEqual(shownError, 'none');
    assert.ok(shownError.includes(tls.last_error.slice(0, 40)), `the card shows the gateway's error: ${shownError} / ${tls.last_error}`);
    await screenshots(page, 'status-tls-self-signed');
  } finally {
    await context?.close();
    await stack.stop();
  }
  // A certificate from files: the card shows it without alarm.
  const ok = await browser.newContext({ baseURL: secure.base, viewport: { width: 1280, height: 800 } });
  try {
    const tab = await ok.newPage();
    await signInAs(tab);
    await tab.goto('/status');
    const card = tab.locator('[data-component="tls"]');
    await card.locator('[data-field="tls-state"]').filter({ hasText: 'certificate served' }).waitFor();
    assert.equal(await card.getAttribute('data-self-signed'), 'false');
    assert.equal(await card.getByRole('alert').count(), 0);
    assert.match(await card.locator('[data-field="issuer"]').innerText(), /Omni UI test CA/);
  } finally {
    await ok.close();
  }
  // Over plain HTTP there is no card.
  const none = await browser.newContext({ baseURL: plain.base });
  try {
    const tab = await none.newPage();
    await signInAs(tab);
    await tab.goto('/status');
    await tab.locator('[data-component="api"]').waitFor();
    assert.equal(await tab.locator('[data-component="tls"]').count(), 0);
  } finally {
    await none.close();
  }
});
