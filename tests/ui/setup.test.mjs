// Onboarding "Storage Configuration": skipping keeps the default storage and
// completes setup; a full submit stores every setting (checked through the
// API) and reports that a restart is required. Each flow needs a fresh
// installation, so each starts its own stack.
//
// Each stack is a fresh install listening on every address, and Chromium
// runs in a network namespace of its own: the gateway sees a client from
// another machine, which may set Omni up only with the setup token the
// gateway logged (opened from the link `…/setup#token=…`, it is filled in).

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { launchBrowser, localStorageLength, makeNetns, openPage, screenshots, setupToken, startStack as start } from './harness.mjs';

let browser;
let netns;
before(async () => {
  netns = makeNetns();
  browser = await launchBrowser({ netns });
});
after(async () => {
  await browser?.close();
  netns?.remove();
});

const startStack = (label) => start(label, { netns });

async function setupStatus(stack) {
  const response = await stack.api('/api/v1/setup/status');
  assert.equal(response.status, 200);
  return response.json();
}

test('first run opens onboarding; "Skip – use default storage" completes setup with the default storage', async () => {
  const stack = await startStack('setup-skip');
  const { context, page } = await openPage(browser, stack);
  try {
    const token = await setupToken(stack);
    await page.goto(`/setup#token=${token}`);
    await page.getByRole('heading', { name: 'Storage Configuration' }).waitFor();
    assert.equal(new URL(page.url()).pathname, '/setup');
    assert.equal(new URL(page.url()).hash, '', 'the token leaves the address bar');
    assert.equal(await page.getByLabel('Setup token').inputValue(), token, 'filled in from the link');
    await screenshots(page, 'setup-storage');

    await page.getByRole('button', { name: 'Skip – use default storage' }).click();
    await page.getByRole('heading', { name: 'Create the admin account' }).waitFor();
    // The storage kept is the one the gateway runs, with where its directory came from.
    const kept = await page.locator('#storage-kept').innerText();
    assert.ok(kept.includes(`${stack.cwd}/data/postgres`) && kept.includes('(the default)'), kept);
    assert.match(await page.getByLabel('API key', { exact: true }).inputValue(), /^sk-omni-[A-Za-z0-9_-]{43}$/);
    await page.getByLabel('Password', { exact: true }).fill('correct horse battery');
    await page.getByLabel('Repeat the password').fill('correct horse battery');
    await screenshots(page, 'setup-api-key');
    await page.getByRole('button', { name: 'Finish setup' }).click();
    await page.getByRole('heading', { name: 'Setup complete' }).waitFor();
    await page.getByRole('button', { name: 'Go to the dashboard' }).click();
    await page.getByRole('heading', { name: 'Dashboard' }).waitFor();

    const status = await setupStatus(stack);
    assert.equal(status.requires_setup, false);
    assert.equal(status.storage_configured, false);
    // Completed setup no longer shows the key, and the token opens nothing.
    assert.equal((await stack.api('/api/v1/setup/api-key')).status, 401);
    for (const [method, route] of [['GET', '/api/v1/setup/api-key'], ['POST', '/api/v1/setup/admin'], ['POST', '/api/v1/setup/initialize']]) {
      const response = await stack.api(route, {
        method,
        headers: { 'x-omni-setup-token': token, 'content-type': 'application/json' },
        body: method === 'POST' ? JSON.stringify({ username: 'eve', password: 'long enough', data_dir: '/x' }) : undefined,
      });
      assert.equal(response.status, 401, `${method} ${route} with the spent token`);
    }
    assert.equal(await localStorageLength(page), 0);
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
    await stack.stop();
  }
});

test('a full submit validates, summarises, stores the settings and says a restart is required', async () => {
  const stack = await startStack('setup-full');
  const { context, page } = await openPage(browser, stack);
  try {
    await page.goto(`/setup#token=${await setupToken(stack)}`);
    await page.getByRole('heading', { name: 'Storage Configuration' }).waitFor();

    // Memory mode warns about data loss; an external URL is checked in the browser.
    await page.getByRole('radio', { name: /In memory/ }).check();
    await page.locator('#memory-warning').filter({ hasText: 'deleted every time Omni stops' }).waitFor();
    await page.getByRole('radio', { name: /External PostgreSQL/ }).check();
    await page.getByLabel('PostgreSQL URL').fill('mysql://nope');
    await page.getByRole('button', { name: 'Review settings' }).click();
    await page.locator('#database_url-error').filter({ hasText: 'postgres://' }).waitFor();
    assert.equal(await page.getByLabel('PostgreSQL URL').getAttribute('aria-invalid'), 'true');
    await screenshots(page, 'setup-validation');

    await page.getByRole('radio', { name: /Filesystem/ }).check();
    await page.getByLabel('Data directory').fill('./data/custom-postgres');

    await page.locator('#replication-section > summary').click();
    await page.getByLabel('Enable replication').check();
    await page.getByLabel('Replication target URL').fill('http://not-postgres');
    await page.getByRole('button', { name: 'Review settings' }).click();
    await page.locator('#replication_url-error').filter({ hasText: 'postgres://' }).waitFor();
    await page.getByLabel('Replication target URL').fill('postgres://replicator:s3cret@replica.example.com:5432/postgres');
    await page.getByLabel('Databases to replicate').fill('omni, app_*');

    await page.locator('#redis-section > summary').click();
    await page.getByLabel('Enable Redis').check();
    await page.getByLabel('Redis URL').fill('redis://cache.example.com:6379/0');
    await page.getByLabel('Key prefix').fill('omni:');
    await page.getByLabel('Cache lifetime (seconds)').fill('300');
    await page.getByLabel('Cache instance data in Redis').check();
    await page.getByRole('button', { name: 'Review settings' }).click();

    await page.getByRole('heading', { name: 'Review storage settings' }).waitFor();
    const summary = await page.locator('#setup-summary').innerText();
    assert.match(summary, /\.\/data\/custom-postgres/);
    assert.match(summary, /replicator:\*\*\*@replica\.example\.com/);
    assert.doesNotMatch(summary, /s3cret/);
    await screenshots(page, 'setup-summary');

    await page.getByRole('button', { name: 'Save settings' }).click();
    await page.getByRole('heading', { name: 'Create the admin account' }).waitFor();
    await page.locator('#restart-required').filter({ hasText: 'Restart required' }).waitFor();
    await page.getByLabel('Password', { exact: true }).fill('correct horse battery');
    await page.getByLabel('Repeat the password').fill('correct horse battery');
    await page.getByRole('button', { name: 'Finish setup' }).click();
    await page.getByRole('heading', { name: 'Setup complete' }).waitFor();
    await page.locator('#restart-required').waitFor();
    await screenshots(page, 'setup-done');

    const status = await setupStatus(stack);
    assert.equal(status.requires_setup, false);
    assert.equal(status.storage_configured, true);
    const { database_url: externalUrl, ...storage } = status.storage;
    assert.ok(externalUrl === undefined || externalUrl === null, `no external database was chosen, got ${externalUrl}`);
    assert.deepEqual(storage, {
      data_dir: './data/custom-postgres',
      memory_mode: false,
      replication_enabled: true,
      replication_url: 'postgres://replicator:***@replica.example.com:5432/postgres',
      replication_databases: 'omni, app_*',
      redis_enabled: true,
      redis_url: 'redis://cache.example.com:6379/0',
      redis_prefix_key: 'omni:',
      redis_ttl: 300,
      redis_save_instances: true,
    });

    // Finishing signed this tab in: the dashboard opens without the login page.
    await page.getByRole('button', { name: 'Go to the dashboard' }).click();
    await page.getByRole('heading', { name: 'Dashboard' }).waitFor();

    // Later visits review the saved settings instead of onboarding again.
    await page.goto('/setup');
    await page.getByText('Setup is complete. Changes apply the next time Omni starts').waitFor();
    assert.equal(await page.getByLabel('Data directory').inputValue(), './data/custom-postgres');
    assert.equal(await page.getByRole('button', { name: 'Skip – use default storage' }).count(), 0);
    assert.equal(await localStorageLength(page), 0);
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
    await stack.stop();
  }
});

test('a server-side refusal shows the API detail on the review step', async () => {
  const stack = await startStack('setup-refused');
  const { context, page } = await openPage(browser, stack);
  try {
    await page.goto(`/setup#token=${await setupToken(stack)}`);
    await page.getByRole('heading', { name: 'Storage Configuration' }).waitFor();
    // A URL the browser accepts but the server's PostgreSQL URL parser refuses.
    await page.locator('#replication-section > summary').click();
    await page.getByLabel('Enable replication').check();
    await page.getByLabel('Replication target URL').fill('postgres://host/db?sslmode=bogus');
    await page.getByRole('button', { name: 'Review settings' }).click();
    await page.getByRole('heading', { name: 'Review storage settings' }).waitFor();
    await page.getByRole('button', { name: 'Save settings' }).click();
    await page.locator('#setup-error').filter({ hasText: 'replication_url' }).waitFor();
    assert.equal((await setupStatus(stack)).storage_configured, false);
    assert.equal(await localStorageLength(page), 0);
  } finally {
    await context.close();
    await stack.stop();
  }
});

test('choosing an external PostgreSQL stores its URL (masked when read back)', async () => {
  const stack = await startStack('setup-external');
  const { context, page } = await openPage(browser, stack);
  try {
    const doc = await (await stack.api('/api/v1/openapi.json')).json();
    assert.ok(doc.components?.schemas?.StorageSettings?.properties?.database_url, 'POST /setup/initialize accepts database_url');
    await page.goto(`/setup#token=${await setupToken(stack)}`);
    await page.getByRole('radio', { name: /External PostgreSQL/ }).check();
    await page.getByLabel('PostgreSQL URL').fill('postgresql://omni:hunter2@db.example.com:5432/omni');
    await page.getByRole('button', { name: 'Review settings' }).click();
    await page.getByRole('heading', { name: 'Review storage settings' }).waitFor();
    assert.match(await page.locator('#setup-summary').innerText(), /omni:\*\*\*@db\.example\.com/);
    await page.getByRole('button', { name: 'Save settings' }).click();
    await page.getByRole('heading', { name: 'Create the admin account' }).waitFor();
    const status = await setupStatus(stack);
    assert.equal(status.storage.database_url, 'postgresql://omni:***@db.example.com:5432/omni');
    assert.equal(status.storage.memory_mode, false);
    assert.equal(await localStorageLength(page), 0);
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
    await stack.stop();
  }
});

test('from another machine, nothing is set up without the setup token; typing it in finishes the wizard', async () => {
  const stack = await startStack('setup-token');
  const { context, page } = await openPage(browser, stack);
  try {
    const token = await setupToken(stack);
    await page.goto('/setup');
    await page.getByRole('heading', { name: 'Storage Configuration' }).waitFor();
    assert.equal(await page.getByLabel('Setup token').inputValue(), '');
    await page.getByRole('radio', { name: /Filesystem/ }).check();
    await page.getByLabel('Data directory').fill('./data/elsewhere');
    await page.getByRole('button', { name: 'Review settings' }).click();
    await page.getByRole('button', { name: 'Save settings' }).click();
    await page.locator('#setup-error').filter({ hasText: 'setup token' }).waitFor();
    assert.equal((await setupStatus(stack)).storage_configured, false, 'no storage change without the token');
    await screenshots(page, 'setup-token-required');

    await page.getByLabel('Setup token').fill('wrong-token-0123456789abcdefghijklmnop');
    await page.getByRole('button', { name: 'Save settings' }).click();
    await page.locator('#setup-error').filter({ hasText: 'does not match' }).waitFor();

    await page.getByLabel('Setup token').fill(token);
    await page.getByRole('button', { name: 'Save settings' }).click();
    await page.getByRole('heading', { name: 'Create the admin account' }).waitFor();
    await page.getByLabel('Password', { exact: true }).fill('correct horse battery');
    await page.getByLabel('Repeat the password').fill('correct horse battery');
    await page.getByRole('button', { name: 'Finish setup' }).click();
    await page.getByRole('heading', { name: 'Setup complete' }).waitFor();
    const rows = await stack.query('SELECT username, role FROM omni_accounts');
    assert.deepEqual(rows, [{ username: 'admin', role: 'admin' }]);
    assert.equal((await setupStatus(stack)).requires_setup, false);
    const again = await stack.api('/api/v1/setup/admin', {
      method: 'POST',
      headers: { 'x-omni-setup-token': token, 'content-type': 'application/json' },
      body: JSON.stringify({ username: 'eve', password: 'long enough' }),
    });
    assert.equal(again.status, 401, 'the token is spent');
    assert.deepEqual(page.problems, []);
  } finally {
    await context.close();
    await stack.stop();
  }
});
