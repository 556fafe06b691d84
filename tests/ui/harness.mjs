// Test kit for the browser tests: the real stack, a real Chromium.
//
// startStack() starts target/debug/omni-gateway in a fresh temporary working
// directory (its own process group, a free port, PGSERVE_PORT=0, a fixed API
// key, OMNI_UI_DIR = ui-dist) and waits for GET /health, which answers 200
// only once PostgreSQL and the worker are ready. With { installed: true } the
// two binaries are first put alone into that empty directory and started
// from there without OMNI_UI_DIR: the install as shipped, whose UI is the one
// built into omni-api. The browser then uses the
// gateway's port, as a user does. Every process group is killed at the end,
// also when a test fails or the runner exits early. Nothing here sleeps in
// place of a condition: waitFor() polls.
//
// HTTPS: makeTestCA() makes a CA and a certificate for 127.0.0.1 with
// openssl; startStack({ https: { ca, cert, key } }) serves the port with
// it (or { https: { insecure: true } } for a gateway that makes its own,
// self-signed), and launchBrowser({ trust: ca }) gives Chromium an NSS
// database that trusts that CA, as an administrator would install it.

import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const UI_DIR = path.join(ROOT, 'ui-dist');
export const SCREENSHOTS = path.join(ROOT, 'target', 'ui-screenshots');
const LOGS = path.join(ROOT, 'target', 'ui-logs');
export const API_KEY = 'sk-omni-ui-test-0123456789abcdefghijklmnop';
export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
  '--no-first-run', '--disable-sync', '--disable-quic',
];

// ---------------------------------------------------------------- processes

/** Process groups still running; killed on exit whatever happens. */
const groups = new Set();
process.on('exit', () => {
  for (const pid of groups) {
    try { process.kill(-pid, 'SIGKILL'); } catch { /* already gone */ }
  }
});
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => process.exit(130));
}

function binary(name) {
  const file = path.join(ROOT, 'target', 'debug', name);
  if (!fs.existsSync(file)) throw new Error(`${file} does not exist: run \`cargo build --workspace\` first`);
  return file;
}

/** Spawns `command` as the leader of a new process group, logging to target/ui-logs. */
function spawnGroup(label, command, args, { cwd, env }) {
  fs.mkdirSync(LOGS, { recursive: true });
  const logFile = path.join(LOGS, `${label}-${process.pid}-${Date.now()}.log`);
  const log = fs.createWriteStream(logFile);
  const child = spawn(command, args, { cwd, env, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  groups.add(child.pid);
  const proc = { child, pid: child.pid, output: '', logFile, exited: null };
  for (const stream of [child.stdout, child.stderr]) {
    stream.on('data', (chunk) => {
      proc.output += chunk.toString();
      log.write(chunk);
    });
  }
  child.on('exit', (code, signal) => {
    proc.exited = { code, signal };
    log.end();
  });
  return proc;
}

/** SIGTERM to the group, SIGKILL after `graceMs`. */
async function stopGroup(proc, graceMs = 5000) {
  if (!proc) return;
  const gone = () => proc.exited !== null;
  if (!gone()) {
    try { process.kill(-proc.pid, 'SIGTERM'); } catch { /* already gone */ }
    try {
      await waitFor(() => gone(), { timeout: graceMs, what: `${proc.pid} to stop` });
    } catch {
      try { process.kill(-proc.pid, 'SIGKILL'); } catch { /* already gone */ }
      await waitFor(() => gone(), { timeout: 5000, what: `${proc.pid} to die` }).catch(() => {});
    }
  }
  // The group may outlive its leader (children of the gateway): make sure.
  try { process.kill(-proc.pid, 'SIGKILL'); } catch { /* nothing left */ }
  groups.delete(proc.pid);
}

// ---------------------------------------------------------------- waiting

/** Polls `check` every 50 ms until it returns a truthy value. */
export async function waitFor(check, { timeout = 30000, what = 'a condition' } = {}) {
  const deadline = Date.now() + timeout;
  let lastError;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (error) {
      lastError = error;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeout} ms waiting for ${what}${lastError ? `: ${lastError.message}` : ''}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

function bindable(port) {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.unref();
    server.on('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

/**
 * A port that was free a moment ago, picked at random below the kernel's
 * ephemeral range (as the Rust test kit's free_port does): a port from that
 * range can be taken by any outgoing connection before the gateway binds it.
 */
export async function freePort() {
  let low = 32768;
  try {
    low = Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || low;
  } catch {}
  const from = Math.max(1024, low - 12000);
  for (;;) {
    const port = from + Math.floor(Math.random() * (low - from));
    if (await bindable(port)) return port;
  }
}

async function status(url, tls = null) {
  try {
    const response = await (tls ? httpsFetch(url, {}, tls) : fetch(url));
    await response.arrayBuffer();
    return response.status;
  } catch {
    return 0;
  }
}

/**
 * fetch() over HTTPS trusting `tls.ca` (PEM) only, or nothing at all with
 * `tls.insecure` (a gateway's own self-signed stand-in). Node's fetch takes
 * no CA of its own; this answers the part of a Response the tests use.
 */
export function httpsFetch(url, { method = 'GET', headers = {}, body } = {}, tls) {
  return new Promise((resolve, reject) => {
    const request = https.request(url, { method, headers, ca: tls.ca, rejectUnauthorized: !tls.insecure }, (res) => {
      const chunks = [];
      res.on('data', (chunk) => chunks.push(chunk));
      res.on('error', reject);
      res.on('end', () => {
        const buffer = Buffer.concat(chunks);
        resolve({
          status: res.statusCode,
          headers: res.headers,
          arrayBuffer: async () => buffer,
          text: async () => buffer.toString('utf8'),
          json: async () => JSON.parse(buffer.toString('utf8')),
        });
      });
    });
    request.on('error', reject);
    if (body !== undefined) request.write(body);
    request.end();
  });
}

/**
 * A certificate authority and a certificate it signed for 127.0.0.1 and
 * localhost, made with openssl in `dir`: { ca (PEM), caFile, cert, key }
 * (files; the key is mode 600, as the gateway requires).
 */
export function makeTestCA(dir) {
  fs.mkdirSync(dir, { recursive: true });
  const file = (name) => path.join(dir, name);
  const openssl = (...args) => execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '90',
    '-subj', '/CN=Omni UI test CA', '-keyout', file('ca.key'), '-out', file('ca.pem'),
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign');
  openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', '/CN=127.0.0.1',
    '-keyout', file('server.key'), '-out', file('server.csr'));
  fs.writeFileSync(file('server.ext'), [
    'subjectAltName=IP:127.0.0.1,DNS:localhost', 'basicConstraints=critical,CA:FALSE',
    'keyUsage=critical,digitalSignature', 'extendedKeyUsage=serverAuth', '',
  ].join('\n'));
  openssl('x509', '-req', '-in', file('server.csr'), '-CA', file('ca.pem'), '-CAkey', file('ca.key'), '-CAcreateserial',
    '-days', '90', '-extfile', file('server.ext'), '-out', file('server.pem'));
  fs.chmodSync(file('server.key'), 0o600);
  return { ca: fs.readFileSync(file('ca.pem'), 'utf8'), caFile: file('ca.pem'), cert: file('server.pem'), key: file('server.key') };
}

// ---------------------------------------------------------------- the stack

/**
 * Starts the gateway (and, until the gateway proxies the API, a worker
 * beside it). Returns { base, viaGateway, gatewayBase, db(), api(), stop() }.
 * With `https` ({ ca, cert, key } from makeTestCA(), or { insecure: true }
 * when extraEnv makes the gateway serve its own certificate) the port
 * speaks HTTPS, base is https://127.0.0.1:<port>, and api() trusts the CA.
 */
export async function startStack(label = 'stack', { netns = null, installed = false, extraEnv = null, https: tls = null } = {}) {
  const cwd = fs.mkdtempSync(path.join(os.tmpdir(), `omni-ui-${label}-`));
  // Run as root, PostgreSQL runs as an unprivileged user that must reach its data dir.
  fs.chmodSync(cwd, 0o755);
  const port = await freePort();
  const env = {
    ...process.env,
    OMNI_HOST: '127.0.0.1',
    OMNI_PORT: String(port),
    PGSERVE_PORT: '0',
    OMNI_API_KEY: API_KEY,
    OMNI_UI_DIR: UI_DIR,
    LOG_FORMAT: 'json',
  };
  delete env.DATABASE_URL;
  if (tls) {
    if (tls.cert) Object.assign(env, { OMNI_TLS_CERT: tls.cert, OMNI_TLS_KEY: tls.key });
    // The redirecting plain port would default to 80; a free one keeps stacks apart.
    env.OMNI_HTTP_PORT = String(await freePort());
  }
  // More variables, made from the stack's own directory: (cwd) => ({ NAME: value }).
  if (extraEnv) Object.assign(env, extraEnv(cwd));
  let gatewayBin = binary('omni-gateway');
  if (installed) {
    delete env.OMNI_UI_DIR;
    for (const name of ['omni-gateway', 'omni-api']) {
      // A hard link where the file system allows, a copy otherwise: a file at a new path either way.
      try { fs.linkSync(binary(name), path.join(cwd, name)); } catch { fs.copyFileSync(binary(name), path.join(cwd, name)); }
      fs.chmodSync(path.join(cwd, name), 0o755);
    }
    gatewayBin = path.join(cwd, 'omni-gateway');
  }
  if (netns) {
    // A fresh install reached from another address: listening everywhere,
    // no OMNI_API_KEY (which would count as set up).
    env.OMNI_HOST = '0.0.0.0';
    delete env.OMNI_API_KEY;
  }
  const stack = { cwd, gateway: null, worker: null, stop: null };
  stack.stop = async () => {
    await stopGroup(stack.worker);
    await stopGroup(stack.gateway);
    fs.rmSync(cwd, { recursive: true, force: true });
  };
  try {
    stack.gateway = spawnGroup(`gateway-${label}`, gatewayBin, [], { cwd, env });
    stack.gatewayBase = `${tls ? 'https' : 'http'}://127.0.0.1:${port}`;
    stack.tls = tls;
    await waitFor(async () => {
      if (stack.gateway.exited) throw new Error(`the gateway exited (${JSON.stringify(stack.gateway.exited)}); log: ${stack.gateway.logFile}`);
      return (await status(`${stack.gatewayBase}/health`, tls)) === 200;
    }, { timeout: 60000, what: 'the gateway /health to answer 200' });

    const match = stack.gateway.output.match(/PostgreSQL \d+ on 127\.0\.0\.1:(\d+)/);
    if (!match) throw new Error(`the PostgreSQL port is not in the gateway log ${stack.gateway.logFile}`);
    const password = fs.readFileSync(path.join(cwd, 'data', 'postgres.password'), 'utf8').trim();
    stack.pg = { host: '127.0.0.1', port: Number(match[1]), user: 'postgres', password, database: 'omni' };

    await useGateway(stack);
    if (netns) stack.base = `http://${netns.hostAddr}:${port}`;
  } catch (error) {
    await stack.stop();
    throw error;
  }
  stack.api = (p, options = {}) => (tls ? httpsFetch(`${stack.base}${p}`, options, tls) : fetch(`${stack.base}${p}`, options));
  stack.query = async (sql, params = []) => {
    const client = new pg.Client(stack.pg);
    await client.connect();
    try {
      return (await client.query(sql, params)).rows;
    } finally {
      await client.end();
    }
  };
  return stack;
}

/** The setup token the stack's worker logged (`setup token: …`). */
export async function setupToken(stack) {
  return waitFor(() => {
    const match = stack.gateway.output.match(/setup token: ([A-Za-z0-9]{32,})/);
    return match ? match[1] : null;
  }, { timeout: 30000, what: 'the worker to log the setup token' });
}

/**
 * A network namespace joined to this one by a veth pair: this side holds
 * 10.213.<n>.1/30, the namespace .2. Chromium launched with
 * launchBrowser({ netns }) runs inside it, so the gateway sees a client from
 * another address, as from another machine; traffic goes nowhere else.
 * Needs root and `ip`. remove() deletes it (also at exit).
 */
export function makeNetns() {
  const n = (process.pid % 200) + 30;
  const name = `omni-ui-${process.pid}`;
  const hostIf = `omu${process.pid % 100000}h`;
  const nsIf = `omu${process.pid % 100000}n`;
  const ip = (...args) => execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const ns = {
    name, hostAddr: `10.213.${n}.1`, nsAddr: `10.213.${n}.2`,
    remove() {
      try { ip('link', 'del', hostIf); } catch { /* gone with the namespace */ }
      try { ip('netns', 'del', name); } catch { /* already removed */ }
    },
  };
  process.on('exit', () => ns.remove());
  ip('netns', 'add', name);
  ip('link', 'add', hostIf, 'type', 'veth', 'peer', 'name', nsIf);
  ip('link', 'set', nsIf, 'netns', name);
  ip('addr', 'add', `${ns.hostAddr}/30`, 'dev', hostIf);
  ip('link', 'set', hostIf, 'up');
  ip('netns', 'exec', name, 'ip', 'addr', 'add', `${ns.nsAddr}/30`, 'dev', nsIf);
  ip('netns', 'exec', name, 'ip', 'link', 'set', nsIf, 'up');
  ip('netns', 'exec', name, 'ip', 'link', 'set', 'lo', 'up');
  return ns;
}

/** Everything goes through the gateway's port, as it does for a user. */
async function useGateway(stack) {
  await waitFor(async () => (await status(`${stack.gatewayBase}/api/v1/health`, stack.tls)) === 200,
    { timeout: 30000, what: 'the worker to answer /api/v1/health through the gateway' });
  stack.base = stack.gatewayBase;
  stack.viaGateway = true;
}

// ---------------------------------------------------------------- browser

/**
 * A HOME whose NSS database (~/.pki/nssdb, where Chromium on Linux reads
 * the certificate authorities an administrator added) trusts `caFile` for
 * servers. Needs certutil (Debian's libnss3-tools; tests/ui/run.sh installs it).
 */
function homeTrusting(caFile) {
  const home = fs.mkdtempSync(path.join(os.tmpdir(), 'omni-ui-home-'));
  const db = path.join(home, '.pki', 'nssdb');
  fs.mkdirSync(db, { recursive: true });
  const certutil = (...args) => execFileSync('certutil', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  certutil('-N', '-d', `sql:${db}`, '--empty-password');
  certutil('-A', '-d', `sql:${db}`, '-n', 'omni-ui-test-ca', '-t', 'C,,', '-i', caFile);
  process.on('exit', () => fs.rmSync(home, { recursive: true, force: true }));
  return home;
}

/** Chromium; with { trust: caFile } it trusts that CA (see homeTrusting). */
export async function launchBrowser({ netns = null, trust = null } = {}) {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} not found: install it with \`apt-get install -y chromium\` (tests/ui/run.sh does)`);
  }
  const env = trust ? { ...process.env, HOME: homeTrusting(trust) } : undefined;
  let executablePath = CHROMIUM;
  if (netns) {
    // Playwright speaks to Chromium over pipes, which cross namespaces.
    executablePath = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'omni-ui-netns-')), 'chromium');
    fs.writeFileSync(executablePath, `#!/bin/sh\nexec ip netns exec ${netns.name} ${CHROMIUM} "$@"\n`, { mode: 0o755 });
  }
  return chromium.launch({ executablePath, args: CHROMIUM_ARGS, headless: true, env });
}

/**
 * A new browser context (a new tab session) with a page on `stack`.
 * `page.problems` collects uncaught page errors; with { strict: true } also
 * every console error (Chromium logs one for each 4xx/5xx answer), every
 * request that failed, and every answer of 400 or more.
 */
export async function openPage(browser, stack, { width = 1280, height = 800, strict = false, ignoreHTTPSErrors = false } = {}) {
  const context = await browser.newContext({ baseURL: stack.base, viewport: { width, height }, ignoreHTTPSErrors });
  const page = await context.newPage();
  page.setDefaultTimeout(15000);
  const problems = [];
  page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  if (strict) {
    page.on('console', (message) => {
      if (message.type() === 'error') problems.push(`console error on ${page.url()}: ${message.text()}`);
    });
    page.on('requestfailed', (request) => {
      const reason = request.failure()?.errorText ?? 'failed';
      // A stream or fetch cut short by leaving the page is not a failure.
      if (reason !== 'net::ERR_ABORTED') problems.push(`request failed: ${request.method()} ${request.url()}: ${reason}`);
    });
    page.on('response', (response) => {
      if (response.status() >= 400) problems.push(`${response.status()} for ${response.request().method()} ${response.url()}`);
    });
  }
  page.problems = problems;
  return { context, page };
}

/** Signs in with the API key through the login page and waits for the dashboard. */
export async function signIn(page, key = API_KEY) {
  await page.goto('/login');
  await page.getByRole('button', { name: 'Use an API key instead' }).click();
  await page.getByLabel('API key', { exact: true }).fill(key);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('heading', { name: 'Dashboard' }).waitFor();
}

/** The admin account createAdmin() makes. */
export const ADMIN = { username: 'admin', password: 'correct horse battery' };

/**
 * Creates the admin account over the API with the key (the stack has
 * OMNI_API_KEY, so it counts as set up and has no setup routes).
 */
export async function createAdmin(stack, { username, password } = ADMIN) {
  const created = await stack.api('/api/v1/accounts', {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': API_KEY },
    body: JSON.stringify({ username, password, role: 'admin' }),
  });
  if (created.status !== 201) throw new Error(`POST /api/v1/accounts answered ${created.status}: ${await created.text()}`);
}

/** Signs in with a username and password through the login page and waits for the dashboard. */
export async function signInAs(page, { username, password } = ADMIN) {
  await page.goto('/login');
  await page.getByLabel('Username').fill(username);
  await page.getByLabel('Password').fill(password);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('heading', { name: 'Dashboard' }).waitFor();
}

export async function localStorageLength(page) {
  return page.evaluate(() => window.localStorage.length);
}

/** Saves `name`-1280.png and `name`-360.png under target/ui-screenshots/. */
export async function screenshots(page, name) {
  fs.mkdirSync(SCREENSHOTS, { recursive: true });
  const original = page.viewportSize();
  for (const [width, height] of [[1280, 800], [360, 740]]) {
    await page.setViewportSize({ width, height });
    // Let layout settle for the new width before capturing.
    await page.evaluate(() => new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve))));
    await page.screenshot({ path: path.join(SCREENSHOTS, `${name}-${width}.png`), fullPage: true });
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    if (overflow > 0) throw new Error(`${name} overflows horizontally by ${overflow}px at ${width}px wide`);
  }
  await page.setViewportSize(original);
}
