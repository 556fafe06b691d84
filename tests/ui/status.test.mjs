// Status page: every supervised component with its state, pid and restarts,
// kept current from /gateway/events or, failing that, /gateway/status. Killing
// the worker shows its restart count go up without a reload.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { API_KEY, launchBrowser, localStorageLength, openPage, screenshots, signIn, startStack, waitFor } from './harness.mjs';

let stack;
let browser;
before(async () => {
  stack = await startStack('status');
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await stack?.stop();
});

async function gatewayStatus() {
  const response = await fetch(`${stack.gatewayBase}/gateway/status`);
  assert.equal(response.status, 200);
  return response.json();
}

test('the status page lists each component with its state and pid', async () => {
  const { context, page } = await openPage(browser, stack);
  try {
    await signIn(page);
    await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Status' }).click();
    await page.getByRole('heading', { name: 'Service status' }).waitFor();
    const status = await gatewayStatus();
    for (const component of status.components) {
      const card = page.locator(`[data-component="${component.name}"]`);
      await card.locator('[data-field="state"]').filter({ hasText: 'ready' }).waitFor();
      assert.equal(await card.locator('[data-field="pid"]').innerText(), String(component.pid));
    }
    // The WAL archive's card says what it is for, not its internal name.
    const wal = page.locator('[data-component="wal"]');
    assert.ok(status.components.some((c) => c.name === 'wal'), 'the WAL archive runs by default');
    assert.equal(await wal.getByRole('heading').innerText(), 'Point-in-time recovery');
    assert.match(await wal.locator('[data-field="about"]').innerText(), /WAL archive/);
    await screenshots(page, 'status');
    assert.equal(await localStorageLength(page), 0);
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
  }
});

test('the worker card says whether this gateway leads the scheduled backups', async () => {
  // Alone on its database, this gateway's worker takes the leader lock
  // within a second; the gateway reads it on its next liveness check.
  const deadline = Date.now() + 15000;
  let api;
  do {
    api = (await gatewayStatus()).components.find((c) => c.name === 'api');
    if (api?.leader === true) break;
    await new Promise((resolve) => setTimeout(resolve, 200));
  } while (Date.now() < deadline);
  assert.equal(api?.leader, true, `the only gateway leads: ${JSON.stringify(api)}`);
  const { context, page } = await openPage(browser, stack);
  try {
    await signIn(page);
    await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Status' }).click();
    const card = page.locator('[data-component="api"]');
    const leader = card.locator('[data-field="leader"]').filter({ hasText: 'leader: run here' });
    await leader.waitFor();
    // Never broken mid-word ("leade / r: run here"): the value is one line, at any width.
    for (const width of [1280, 900, 360]) {
      await page.setViewportSize({ width, height: 800 });
      const lines = await leader.evaluate((dd) => {
        const range = document.createRange();
        range.selectNodeContents(dd);
        return new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size;
      });
      assert.equal(lines, 1, `"leader: run here" on ${lines} lines at ${width}px`);
    }
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
  }
});

test('killing the worker shows its restart count go up without a reload', async (t) => {
  const worker = (await gatewayStatus()).components.find((c) => c.name === 'api');
  assert.ok(worker, 'the gateway supervises the API worker');
  const { context, page } = await openPage(browser, stack);
  try {
    await signIn(page);
    await page.goto('/status');
    const card = page.locator('[data-component="api"]');
    await card.locator('[data-field="pid"]').filter({ hasText: String(worker.pid) }).waitFor();
    const before = Number(await card.locator('[data-field="restarts"]').innerText());
    // A marker on the window proves the page was not reloaded.
    await page.evaluate(() => { window.__noReload = true; });

    process.kill(worker.pid, 'SIGKILL');

    await page.waitForFunction((n) => {
      const cell = document.querySelector('[data-component="api"] [data-field="restarts"]');
      return cell && Number(cell.textContent) > n;
    }, before, { timeout: 30000 });
    await card.locator('[data-field="state"]').filter({ hasText: 'ready' }).waitFor({ timeout: 30000 });
    assert.notEqual(await card.locator('[data-field="pid"]').innerText(), String(worker.pid));
    assert.match(await card.locator('[data-field="last-exit"]').innerText(), /\S/);
    assert.equal(await page.evaluate(() => window.__noReload), true);
    // The event stream closed with the old worker; the page reconnects to the new one.
    await page.locator('#live-mode').filter({ hasText: 'Live' }).waitFor({ timeout: 30000 });
    t.diagnostic(`status updates came by: ${await page.locator('#live-mode').innerText()}`);
    assert.equal(await localStorageLength(page), 0);
  } finally {
    await context.close();
  }
});

test('a PostgreSQL that keeps failing shows backoff, the next retry and the crash-loop flag, then recovers', async () => {
  const conf = path.join(stack.cwd, 'data', 'postgres', 'postgresql.conf');
  const good = fs.readFileSync(conf, 'utf8');
  const { context, page } = await openPage(browser, stack);
  try {
    await signIn(page);
    await page.goto('/status');
    const card = page.locator('[data-component="postgres"]');
    await card.locator('[data-field="state"]').filter({ hasText: 'ready' }).waitFor();
    // A setting PostgreSQL rejects at every start, then a crash.
    fs.writeFileSync(conf, `${good}\nshared_buffers = 'not a size'\n`);
    const postgres = (await gatewayStatus()).components.find((c) => c.name === 'postgres');
    process.kill(postgres.pid, 'SIGKILL');

    // Six quick failures (about 6 s of growing delays) flag a crash loop; retries go on.
    await card.locator('[data-field="crash-looping"]').waitFor({ timeout: 30000 });
    await card.locator('[data-field="state"]').filter({ hasText: 'backoff' }).waitFor({ timeout: 30000 });
    assert.match(await card.locator('[data-field="next-retry"]').innerText(), /^in \d+(\.\d)? s$/);
    assert.ok(Number(await card.locator('[data-field="attempts"]').innerText()) >= 6);
    await screenshots(page, 'status-crash-loop');

    fs.writeFileSync(conf, good);
    await card.locator('[data-field="state"]').filter({ hasText: 'ready' }).waitFor({ timeout: 30000 });
  } finally {
    fs.writeFileSync(conf, good);
    await context.close();
  }
});

test('with an off-site repository the charts show its lag, queue and uploads; without one they are not drawn', async () => {
  const offsite = await startStack('status-offsite', { extraEnv: (cwd) => ({ OMNI_REPOSITORY_URL: `file://${cwd}/offsite` }) });
  const { context, page } = await openPage(browser, offsite);
  try {
    // The history records the repository once a sample is taken (every 5 s).
    const history = await waitFor(async () => {
      const response = await fetch(`${offsite.gatewayBase}/gateway/metrics/history`, { headers: { 'x-api-key': API_KEY } });
      const body = await response.json();
      return (body.samples || []).some((s) => typeof s.repository_lag_s === 'number' && s.repository_uploaded_bytes > 0) ? body : null;
    }, { timeout: 120000, what: 'a history sample with the repository after its first uploads' });
    assert.ok(history.samples.every((s) => !('repository_lag_s' in s) || typeof s.repository_queue_bytes === 'number'));
    await signIn(page);
    await page.goto('/status');
    const lag = page.locator('svg[aria-label="Off-site lag (seconds behind)"]');
    await lag.waitFor();
    assert.equal(await lag.locator('path[data-series="oldest not uploaded"]').count(), 1);
    const uploads = page.locator('svg[aria-label="Off-site uploads (MB, MB/s)"]');
    assert.equal(await uploads.locator('path[data-series="queued (MB)"]').count(), 1);
    await screenshots(page, 'status-offsite');
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
    await offsite.stop();
  }
  // The stack without OMNI_REPOSITORY_URL has no such chart.
  const plain = await openPage(browser, stack);
  try {
    await signIn(plain.page);
    await plain.page.goto('/status');
    await plain.page.locator('svg[aria-label^="Latency"]').waitFor();
    assert.equal(await plain.page.locator('svg[aria-label^="Off-site"]').count(), 0);
  } finally {
    await plain.context.close();
  }
});
