// Service status: every supervised component, live, and charts of the
// last hour.
//
// Updates arrive as server-sent events from the gateway itself
// (GET /gateway/events, documents shaped like GET /gateway/status), so the
// stream stays open while the worker restarts. While it is not open the
// page polls /gateway/status every 2 s, and it reconnects with exponential
// backoff. The charts read GET /gateway/metrics/history (API key) every 5 s
// (with an off-site repository, its lag, queue and upload rate too);
// a restart seen on the stream is marked on them at once, before the next
// sample.
//
// With HTTPS on, a card says which certificate the port serves and when it
// expires; a self-signed stand-in (OMNI_TLS_DOMAINS before ACME has
// delivered) is said loudly, with the last ACME error, because every
// browser warns about it. The event stream does not carry `tls`: it comes
// from /gateway/status, read again with the history.

import { call } from '../api.js';
import { formatDuration, h, replace } from '../dom.js';
import { authedCall } from '../session.js';
import { lineChart } from '../chart.js';

const POLL_MS = 2000;
const HISTORY_MS = 5000;
/** The charts' time span. */
const SPAN_MS = 60 * 60 * 1000;
const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 30000;

const NAMES = { postgres: 'PostgreSQL', api: 'API worker', wal: 'Point-in-time recovery', replication: 'Replication' };
// What a card is about, when its name alone does not say.
const ABOUT = { wal: 'The WAL archive: every change is kept, so a restore can reach any moment of the window (Backups page).' };
const STATE_KIND = { ready: 'ok', starting: 'info', backoff: 'warn', stopping: 'warn', stopped: 'warn', failed: 'error' };
/** Fewer days than this before expiry: the certificate is flagged. */
const EXPIRY_WARN_DAYS = 14;

function unixDate(seconds) {
  return typeof seconds === 'number' ? new Date(seconds * 1000).toLocaleString() : '—';
}

/** The HTTPS card (GET /gateway/status `tls`), or nothing when the port speaks plain HTTP. */
function tlsCard(tls) {
  if (!tls?.enabled) return null;
  // The gateway's own words for the stand-in (tls/acme.rs STATE_SELF_SIGNED).
  const selfSigned = typeof tls.state === 'string' && tls.state.startsWith('self-signed');
  const days = typeof tls.expires_in_s === 'number' ? tls.expires_in_s / 86400 : null;
  const expiring = !selfSigned && days !== null && days < EXPIRY_WARN_DAYS;
  const problem = tls.last_error || tls.last_reload_error;
  const [kind, badge] = selfSigned ? ['error', 'self-signed'] : expiring ? ['warn', 'expires soon'] : problem ? ['warn', 'certificate served'] : ['ok', 'certificate served'];
  const acme = tls.acme || null;
  return h('section', { class: 'card', id: 'tls', style: 'margin-bottom:1rem', dataset: { component: 'tls', selfSigned: String(selfSigned) }, 'aria-labelledby': 'tls-title' },
    h('div', { class: 'component-head', style: 'flex-wrap:wrap' },
      h('h2', { id: 'tls-title' }, 'HTTPS'),
      h('span', { class: `badge badge-${kind}`, dataset: { field: 'tls-state' } }, badge)),
    selfSigned ? h('div', { class: 'alert alert-error', role: 'alert', dataset: { field: 'self-signed' } },
      h('strong', {}, 'Self-signed: waiting for the first certificate'),
      `Browsers warn on this address until the certificate authority (${acme?.directory || 'ACME'}) issues one for ${(acme?.domains || []).join(', ') || 'the domains'}. `
        + 'Check that the domains point at this machine and that OMNI_HTTP_PORT is reachable from the internet.') : null,
    h('dl', { class: 'kv' },
      h('dt', {}, 'Certificate'), h('dd', { dataset: { field: 'subject' } }, tls.subject || '—'),
      h('dt', {}, 'Issuer'), h('dd', { dataset: { field: 'issuer' } }, tls.issuer || '—'),
      h('dt', {}, 'Expires'), h('dd', { dataset: { field: 'expires' } },
        `${unixDate(tls.not_after)}${days === null ? '' : ` (in ${formatDuration(tls.expires_in_s)})`}`),
      h('dt', {}, 'Source'), h('dd', { dataset: { field: 'source' } }, tls.source === 'acme' ? `ACME: ${tls.state || '—'}` : `files: ${tls.cert_file || '—'}`),
      acme ? [h('dt', {}, 'Failed attempts'), h('dd', { dataset: { field: 'acme-failures' } }, String(acme.failures ?? 0))] : null,
      acme?.next_attempt_at ? [h('dt', {}, 'Next attempt'), h('dd', { dataset: { field: 'acme-next' } }, unixDate(acme.next_attempt_at))] : null,
      tls.source === 'acme' ? [h('dt', {}, 'Last ACME error'), h('dd', { dataset: { field: 'acme-error' } },
        tls.last_error ? `${tls.last_error}${acme?.last_error_at ? ` (${unixDate(acme.last_error_at)})` : ''}` : 'none')] : null,
      tls.last_reload_error ? [h('dt', {}, 'Last reload refused'), h('dd', { dataset: { field: 'reload-error' } }, tls.last_reload_error)] : null));
}

// The replication relay's own fields: where it sends, how far behind it is.
function replicationRows(c) {
  const lastApplied = typeof c.last_applied_unix === 'number' ? new Date(c.last_applied_unix * 1000).toLocaleString() : '—';
  return [
    h('dt', {}, 'Target'), h('dd', { dataset: { field: 'target' } }, c.target || '—'),
    h('dt', {}, 'Lag'), h('dd', { dataset: { field: 'lag' } }, `${c.lag_bytes ?? 0} bytes, ${(c.lag_seconds ?? 0).toFixed(1)} s`),
    h('dt', {}, 'Last applied'), h('dd', { dataset: { field: 'last-applied' } }, lastApplied),
    h('dt', {}, 'Tables'), h('dd', { dataset: { field: 'tables' } }, String(c.tables ?? 0)),
    c.last_copy ? [h('dt', {}, 'Last full copy'), h('dd', {}, c.last_copy)] : null,
  ];
}

export async function render(main) {
  const grid = h('div', { class: 'grid', id: 'components' }, h('p', { class: 'loading' }, 'Loading status…'));
  const tlsSlot = h('div', { id: 'tls-slot' });
  const overall = h('span', { id: 'overall', class: 'badge' }, 'Checking…');
  const live = h('span', { class: 'live', id: 'live-mode', role: 'status' }, 'Connecting…');
  const error = h('div', { id: 'status-error', role: 'alert' });

  const charts = h('div', { class: 'charts', id: 'charts' }, h('p', { class: 'loading' }, 'Loading history…'));
  const historyNote = h('div', { id: 'history-note', role: 'status' });
  let closed = false;
  let socket = null;
  let historyTimer = null;
  let history = null;
  // Restarts seen on the event stream, marked before the history has them.
  const liveRestarts = [];
  let lastRestarts = null;
  let pollTimer = null;
  let reconnectTimer = null;
  let tickTimer = null;
  let backoff = BACKOFF_MIN_MS;
  let snapshot = null;
  let receivedAt = 0;
  // The cluster's last major upgrade (GET /gateway/status `upgrade`); kept
  // across event messages that do not carry it.
  let upgrade = null;
  // HTTPS (GET /gateway/status `tls`), likewise kept.
  let tls = null;
  let tlsShown = null;

  function show(status) {
    if (!status || !Array.isArray(status.components)) return;
    snapshot = status;
    if (status.upgrade) upgrade = status.upgrade;
    if (status.tls) tls = status.tls;
    noteRestarts(status.components);
    receivedAt = performance.now();
    replace(error);
    draw();
  }

  function draw() {
    if (!snapshot) return;
    const elapsed = (performance.now() - receivedAt) / 1000;
    const components = snapshot.components;
    const stopping = snapshot.gateway?.state === 'stopping';
    const healthy = !stopping && components.length > 0 && components.every((c) => c.state === 'ready');
    const failed = components.some((c) => c.state === 'failed');
    overall.className = `badge badge-${healthy ? 'ok' : failed ? 'error' : 'warn'}`;
    overall.textContent = stopping ? 'Gateway stopping' : healthy ? 'All services ready' : failed ? 'A service has failed' : 'Degraded';
    // Redrawn only when it changed: its alert is announced on every redraw.
    const tlsNow = JSON.stringify(tls);
    if (tlsNow !== tlsShown) {
      tlsShown = tlsNow;
      replace(tlsSlot, tlsCard(tls));
    }
    replace(grid, components.map((c) => {
      const uptime = typeof c.uptime_s === 'number' && c.state === 'ready' ? c.uptime_s + elapsed : c.uptime_s;
      // A child in backoff is retried for ever; say which attempt and when the next one comes.
      const nextRetry = typeof c.next_retry_s === 'number' ? Math.max(0, c.next_retry_s - elapsed) : null;
      return h('section', { class: 'card', dataset: { component: c.name }, 'aria-labelledby': `component-${c.name}` },
        // Wrapping keeps a long state badge from breaking the name mid-word.
        h('div', { class: 'component-head', style: 'flex-wrap:wrap' },
          h('h2', { id: `component-${c.name}` }, NAMES[c.name] || c.name),
          h('span', { class: `badge badge-${STATE_KIND[c.state] || 'warn'}`, dataset: { field: 'state' } }, c.state)),
        ABOUT[c.name] ? h('p', { class: 'hint component-about', dataset: { field: 'about' } }, ABOUT[c.name]) : null,
        c.reloading || c.crash_looping ? h('div', { style: 'display:flex;gap:.4rem;flex-wrap:wrap;margin-bottom:.75rem' },
          c.reloading ? h('span', { class: 'badge badge-info', dataset: { field: 'reloading' } }, 'reloading') : null,
          c.crash_looping ? h('span', { class: 'badge badge-error', dataset: { field: 'crash-looping' } }, 'crash loop') : null) : null,
        h('dl', { class: 'kv' },
          h('dt', {}, 'PID'), h('dd', { dataset: { field: 'pid' } }, c.pid ?? '—'),
          h('dt', {}, 'Uptime'), h('dd', { dataset: { field: 'uptime' } }, uptime === null || uptime === undefined ? '—' : formatDuration(uptime)),
          h('dt', {}, 'Restarts'), h('dd', { dataset: { field: 'restarts' } }, String(c.restarts ?? 0)),
          c.attempts && c.state !== 'ready' ? [h('dt', {}, 'Failures in a row'), h('dd', { dataset: { field: 'attempts' } }, String(c.attempts))] : null,
          nextRetry === null ? null : [h('dt', {}, 'Next retry'), h('dd', { dataset: { field: 'next-retry' } }, `in ${nextRetry.toFixed(nextRetry < 10 ? 1 : 0)} s`)],
          h('dt', {}, 'Last exit'), h('dd', { dataset: { field: 'last-exit' } }, c.last_exit || '—'),
          // Several gateways on one database: one worker leads (runs the scheduled backups).
          typeof c.leader === 'boolean' ? [h('dt', {}, 'Scheduled backups'), h('dd', { class: c.leader ? 'nowrap' : false, dataset: { field: 'leader' } }, c.leader ? 'leader: run here' : 'follower: another gateway runs them')] : null,
          c.name === 'replication' ? replicationRows(c) : null,
          // In backoff the fields above say it all, and keep counting down.
          c.detail && c.state !== 'backoff' ? [h('dt', {}, 'Detail'), h('dd', {}, c.detail)] : null,
          // "upgraded from PostgreSQL 15 to 17 on …, old copy kept at …"
          c.name === 'postgres' && upgrade?.summary ? [h('dt', {}, 'Upgrade'), h('dd', { dataset: { field: 'upgrade' } }, upgrade.summary)] : null));
    }));
  }

  function noteRestarts(components) {
    const now = Date.now();
    const counts = Object.fromEntries(components.map((c) => [c.name, c.restarts ?? 0]));
    if (lastRestarts) {
      let added = false;
      for (const c of components) {
        if ((counts[c.name] ?? 0) > (lastRestarts[c.name] ?? 0)) {
          liveRestarts.push({ unixMs: now, label: `${NAMES[c.name] || c.name} restarted${c.last_exit ? ` (${c.last_exit})` : ''}` });
          added = true;
        }
      }
      if (added) drawCharts();
    }
    lastRestarts = counts;
  }

  async function loadHistory() {
    // The event stream does not carry `tls`; a certificate that arrives shows within one period.
    if (tls) call('/gateway/status').then(show, () => {});
    try {
      history = await authedCall('/gateway/metrics/history');
      drawCharts();
      replace(historyNote);
    } catch (err) {
      // Keep what is drawn (a worker restart makes the check fail for a moment).
      replace(historyNote, h('p', { class: 'alert alert-warn' }, `History not refreshed: ${err.message}`));
      if (!history) replace(charts);
    }
  }

  function drawCharts() {
    if (!history) return;
    const to = Date.now();
    const samples = history.samples || [];
    const first = samples.length ? samples[0].unix_ms : to;
    const from = Math.max(to - SPAN_MS, Math.min(first, to - 5 * 60 * 1000));
    const series = (key) => samples.map((s) => [s.unix_ms, s[key] ?? null]);
    // Restarts the history recorded, plus the ones seen live and not yet in it.
    const recorded = (history.restarts || []).map((r) => ({ unixMs: r.unix_ms, label: `${NAMES[r.component] || r.component} restarted${r.last_exit ? ` (${r.last_exit})` : ''}` }));
    const newest = recorded.length ? recorded[recorded.length - 1].unixMs : 0;
    const markers = recorded.concat(liveRestarts.filter((m) => m.unixMs > newest + 2000));
    const range = [from, to];
    // One column below 45 rem, two above (styles.css .charts).
    const wide = charts.clientWidth;
    const width = wide >= 720 ? (wide - 16) / 2 : wide || 600;
    const list = [
      lineChart({ title: 'Requests', unit: 'per second', series: [
        { name: 'requests/s', className: 's1', points: series('requests_per_s') },
        // Requests the worker could not answer (down, refused, timed out).
        { name: 'upstream errors/s', className: 's2', points: samples.map((s) => [s.unix_ms, (s.upstream_errors ?? 0) / (history.interval_s || 5)]) },
      ], markers, range, width }),
      lineChart({ title: 'Latency', unit: 'ms', series: [
        { name: 'p50', className: 's1', points: series('p50_ms') },
        { name: 'p99', className: 's2', points: series('p99_ms') },
      ], markers, range, width }),
    ];
    const storage = [
      ['replication_lag_s', 'replication lag'], ['wal_age_s', 'newest WAL'], ['base_backup_age_s', 'newest base backup'],
    ].filter(([key]) => samples.some((s) => typeof s[key] === 'number'));
    if (storage.length) {
      list.push(lineChart({ title: 'Storage', unit: 'seconds behind or old', series: storage.map(([key, name], i) => ({ name, className: `s${i + 1}`, points: series(key) })), markers, range, width }));
    }
    // The off-site repository (OMNI_REPOSITORY_URL): how far behind, what waits, what went.
    if (samples.some((s) => typeof s.repository_lag_s === 'number')) {
      const mb = (b) => (typeof b === 'number' ? b / 1048576 : null);
      const uploaded = samples.map((s, i) => {
        const prev = samples[i - 1];
        const ok = prev && typeof s.repository_uploaded_bytes === 'number' && typeof prev.repository_uploaded_bytes === 'number';
        return [s.unix_ms, ok ? mb(Math.max(0, s.repository_uploaded_bytes - prev.repository_uploaded_bytes)) / ((s.unix_ms - prev.unix_ms) / 1000 || 1) : null];
      });
      list.push(lineChart({ title: 'Off-site lag', unit: 'seconds behind', series: [
        { name: 'oldest not uploaded', className: 's1', points: series('repository_lag_s') },
      ], markers, range, width }));
      list.push(lineChart({ title: 'Off-site uploads', unit: 'MB, MB/s', series: [
        { name: 'queued (MB)', className: 's1', points: samples.map((s) => [s.unix_ms, mb(s.repository_queue_bytes)]) },
        { name: 'uploaded (MB/s)', className: 's2', points: uploaded },
      ], markers, range, width }));
    }
    replace(charts, list);
    charts.dataset.markers = String(markers.length);
  }

  async function poll() {
    try {
      show(await call('/gateway/status'));
    } catch (err) {
      replace(error, h('div', { class: 'alert alert-error' }, `Status unavailable: ${err.message}`));
    }
  }

  function startPolling() {
    if (pollTimer || closed) return;
    live.textContent = `Polling every ${POLL_MS / 1000} s`;
    poll();
    pollTimer = setInterval(poll, POLL_MS);
  }

  function stopPolling() {
    clearInterval(pollTimer);
    pollTimer = null;
  }

  function connect() {
    if (closed) return;
    // Public like /gateway/status: EventSource cannot send headers, and the
    // stream carries nothing the status endpoint does not already show.
    try {
      socket = new EventSource('/gateway/events');
    } catch {
      scheduleReconnect();
      return;
    }
    socket.addEventListener('open', () => {
      backoff = BACKOFF_MIN_MS;
      stopPolling();
      live.replaceChildren(h('span', { class: 'badge badge-ok' }, 'Live'));
    });
    socket.addEventListener('status', (event) => {
      try {
        show(JSON.parse(event.data));
      } catch {
        // Not a status document: ignore it.
      }
    });
    socket.addEventListener('error', () => {
      // Our own backoff replaces EventSource's fixed retry.
      socket?.close();
      socket = null;
      if (closed) return;
      live.textContent = 'Reconnecting…';
      startPolling();
      scheduleReconnect();
    });
  }

  function scheduleReconnect() {
    if (closed || reconnectTimer) return;
    startPolling();
    const delay = backoff * (0.8 + Math.random() * 0.4);
    reconnectTimer = setTimeout(() => {
      reconnectTimer = null;
      connect();
    }, delay);
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
  }

  replace(main, h('div', { class: 'container' },
    h('div', { class: 'page-head' },
      h('div', {}, h('h1', {}, 'Service status'), h('p', {}, 'Processes supervised by the Omni gateway.')),
      h('div', { style: 'display:flex;gap:.75rem;align-items:center;flex-wrap:wrap' }, overall, live)),
    error,
    tlsSlot,
    grid,
    h('section', { class: 'card history', 'aria-labelledby': 'history-title' },
      h('div', { class: 'component-head' }, h('h2', { id: 'history-title' }, 'Last hour'),
        h('a', { href: '/logs', class: 'btn btn-sm' }, 'Open logs')),
      historyNote,
      charts)));

  startPolling();
  connect();
  loadHistory();
  historyTimer = setInterval(loadHistory, HISTORY_MS);
  window.addEventListener('resize', drawCharts);
  tickTimer = setInterval(draw, 1000);

  return () => {
    closed = true;
    stopPolling();
    clearTimeout(reconnectTimer);
    clearInterval(tickTimer);
    clearInterval(historyTimer);
    window.removeEventListener('resize', drawCharts);
    if (socket) socket.close();
  };
}
