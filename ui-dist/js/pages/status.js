// Service status: every supervised component, live.
//
// Updates arrive over the WebSocket /api/v1/events (messages shaped like
// GET /gateway/status). While the socket is not open the page polls
// /gateway/status every 2 s, and it reconnects with exponential backoff,
// so the page stays current through worker restarts without a reload.

import { call } from '../api.js';
import { formatDuration, h, replace } from '../dom.js';

const POLL_MS = 2000;
const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 30000;

const NAMES = { postgres: 'PostgreSQL', api: 'API worker', replication: 'Replication' };
const STATE_KIND = { ready: 'ok', starting: 'info', backoff: 'warn', stopping: 'warn', stopped: 'warn', failed: 'error' };

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
  const overall = h('span', { id: 'overall', class: 'badge' }, 'Checking…');
  const live = h('span', { class: 'live', id: 'live-mode', role: 'status' }, 'Connecting…');
  const error = h('div', { id: 'status-error', role: 'alert' });

  let closed = false;
  let socket = null;
  let pollTimer = null;
  let reconnectTimer = null;
  let tickTimer = null;
  let backoff = BACKOFF_MIN_MS;
  let snapshot = null;
  let receivedAt = 0;
  // The cluster's last major upgrade (GET /gateway/status `upgrade`); kept
  // across event messages that do not carry it.
  let upgrade = null;

  function show(status) {
    if (!status || !Array.isArray(status.components)) return;
    snapshot = status;
    if (status.upgrade) upgrade = status.upgrade;
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
    replace(grid, components.map((c) => {
      const uptime = typeof c.uptime_s === 'number' && c.state === 'ready' ? c.uptime_s + elapsed : c.uptime_s;
      // A child in backoff is retried for ever; say which attempt and when the next one comes.
      const nextRetry = typeof c.next_retry_s === 'number' ? Math.max(0, c.next_retry_s - elapsed) : null;
      return h('section', { class: 'card', dataset: { component: c.name }, 'aria-labelledby': `component-${c.name}` },
        // Wrapping keeps a long state badge from breaking the name mid-word.
        h('div', { class: 'component-head', style: 'flex-wrap:wrap' },
          h('h2', { id: `component-${c.name}` }, NAMES[c.name] || c.name),
          h('span', { class: `badge badge-${STATE_KIND[c.state] || 'warn'}`, dataset: { field: 'state' } }, c.state)),
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
          c.name === 'replication' ? replicationRows(c) : null,
          // In backoff the fields above say it all, and keep counting down.
          c.detail && c.state !== 'backoff' ? [h('dt', {}, 'Detail'), h('dd', {}, c.detail)] : null,
          // "upgraded from PostgreSQL 15 to 17 on …, old copy kept at …"
          c.name === 'postgres' && upgrade?.summary ? [h('dt', {}, 'Upgrade'), h('dd', { dataset: { field: 'upgrade' } }, upgrade.summary)] : null));
    }));
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
    try {
      const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
      socket = new WebSocket(`${scheme}//${location.host}/api/v1/events`);
    } catch {
      scheduleReconnect();
      return;
    }
    socket.addEventListener('open', () => {
      backoff = BACKOFF_MIN_MS;
      stopPolling();
      live.replaceChildren(h('span', { class: 'badge badge-ok' }, 'Live'));
      // The socket only speaks on changes; take a snapshot now.
      poll();
    });
    socket.addEventListener('message', (event) => {
      try {
        show(JSON.parse(event.data));
      } catch {
        // Not a status message: ignore it.
      }
    });
    socket.addEventListener('close', () => {
      socket = null;
      if (closed) return;
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
    grid));

  startPolling();
  connect();
  tickTimer = setInterval(draw, 1000);

  return () => {
    closed = true;
    stopPolling();
    clearTimeout(reconnectTimer);
    clearInterval(tickTimer);
    if (socket) socket.close();
  };
}
