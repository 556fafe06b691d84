// Logs: the gateway's recent log (its own lines and every child's), live.
//
// The filters (component, level, search) are applied by the gateway, so
// what is shown is exactly what GET /gateway/logs selects: the page first
// reads the newest lines, then follows GET /gateway/logs/stream with the
// same filters from the last line it has. Both need the API key; the stream
// is read with fetch() rather than EventSource because EventSource cannot
// send the x-api-key header (and a key in the URL would land in proxy logs).
// Pause keeps the stream but holds new lines back until Resume. Download
// saves the lines shown, as text.

import { errorFrom } from '../api.js';
import { h, replace } from '../dom.js';
import { authedCall, authedFetch } from '../session.js';

/** Lines kept on the page; older ones leave the top. */
const MAX_SHOWN = 5000;
const FIRST_READ = 1000;
const RETRY_MS = 2000;
const COMPONENTS = ['gateway', 'postgres', 'api', 'wal', 'replication'];
const LEVELS = [
  ['', 'All levels'], ['error', 'Errors'], ['warn', 'Warnings and errors'], ['info', 'Info and above'], ['debug', 'Debug and above'],
];
const LEVEL_KIND = { error: 'error', warn: 'warn', info: 'info', debug: 'muted', trace: 'muted' };

function formatLine(line) {
  return `${line.time} ${line.level.toUpperCase().padEnd(5)} ${line.component}: ${line.message}`;
}

export async function render(main) {
  const component = h('select', { id: 'log-component' },
    h('option', { value: '' }, 'All components'),
    COMPONENTS.map((c) => h('option', { value: c }, c)));
  const level = h('select', { id: 'log-level' }, LEVELS.map(([value, label]) => h('option', { value }, label)));
  const search = h('input', { id: 'log-search', type: 'search', placeholder: 'Search messages', autocomplete: 'off', spellcheck: 'false' });
  const pause = h('button', { type: 'button', class: 'btn btn-sm', id: 'log-pause', 'aria-pressed': 'false' }, 'Pause');
  const download = h('button', { type: 'button', class: 'btn btn-sm', id: 'log-download' }, 'Download');
  const live = h('span', { class: 'live', id: 'log-live', role: 'status' }, 'Connecting…');
  const count = h('span', { class: 'hint', id: 'log-count' });
  const notice = h('div', { id: 'log-notice' });
  const list = h('ol', { class: 'log-lines', id: 'log-lines', 'aria-live': 'off' });
  const scroller = h('div', { class: 'log-scroll', tabindex: '0', 'aria-label': 'Log lines' }, list);

  let closed = false;
  let paused = false;
  let generation = 0;
  let controller = null;
  let retryTimer = null;
  let searchTimer = null;
  let lastSeq = 0;
  /** Lines shown, oldest first; the DOM mirrors this array. */
  let shown = [];
  /** Lines received while paused. */
  let held = [];
  /** Lines received since the last frame. */
  let pending = [];
  let frame = 0;
  let flushTimer = null;

  function filters() {
    const params = new URLSearchParams();
    if (component.value) params.set('component', component.value);
    if (level.value) params.set('level', level.value);
    if (search.value.trim()) params.set('q', search.value.trim());
    return params;
  }

  function row(line) {
    return h('li', { class: 'log-line', dataset: { seq: String(line.seq), level: line.level, component: line.component } },
      h('time', { datetime: line.time, class: 'log-time' }, line.time.slice(11, 23)),
      h('span', { class: `log-level log-${LEVEL_KIND[line.level] || 'muted'}` }, line.level),
      h('span', { class: 'log-component' }, line.component),
      h('span', { class: 'log-message' }, line.message));
  }

  function atBottom() {
    return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
  }

  /** Appends in one batch per frame, so a flood of lines does not stall the page. */
  /** Components not in the list yet (a tool the gateway ran) become choices. */
  function learnComponents(lines) {
    for (const line of lines) {
      if (![...component.options].some((o) => o.value === line.component)) {
        component.append(h('option', { value: line.component }, line.component));
      }
    }
  }

  function append(lines) {
    if (!lines.length) return;
    learnComponents(lines);
    if (paused) {
      held.push(...lines);
      pause.textContent = `Resume (${held.length} new)`;
      return;
    }
    pending.push(...lines);
    if (!frame) {
      frame = requestAnimationFrame(flush);
      // A tab in the background gets no animation frames: a timer still shows the lines.
      flushTimer = setTimeout(flush, 100);
    }
  }

  function flush() {
    cancelAnimationFrame(frame);
    clearTimeout(flushTimer);
    frame = 0;
    if (!pending.length) return;
    const follow = atBottom();
    const batch = pending.slice(-MAX_SHOWN);
    pending = [];
    shown.push(...batch);
    const fragment = document.createDocumentFragment();
    for (const line of batch) fragment.append(row(line));
    list.append(fragment);
    const excess = shown.length - MAX_SHOWN;
    if (excess > 0) {
      shown = shown.slice(excess);
      for (let i = 0; i < excess && list.firstChild; i += 1) list.firstChild.remove();
    }
    updateCount();
    if (follow) scroller.scrollTop = scroller.scrollHeight;
  }

  function updateCount() {
    count.textContent = `${shown.length} line${shown.length === 1 ? '' : 's'} shown`;
    list.hidden = shown.length === 0;
  }

  async function start() {
    const mine = ++generation;
    if (controller) controller.abort();
    clearTimeout(retryTimer);
    // A search still waiting for its pause is read now: it must not start
    // the same view again (and empty it) a moment later.
    clearTimeout(searchTimer);
    controller = new AbortController();
    const { signal } = controller;
    shown = [];
    held = [];
    pending = [];
    list.replaceChildren();
    delete list.dataset.filters;
    pause.textContent = paused ? 'Resume' : 'Pause';
    replace(notice);
    live.textContent = 'Loading…';
    const params = filters();
    try {
      const first = new URLSearchParams(params);
      first.set('limit', String(FIRST_READ));
      const page = await authedCall(`/gateway/logs?${first}`, { signal });
      if (mine !== generation) return;
      lastSeq = page.last_seq;
      append(page.lines);
      // Which filters the lines shown answer (for tests and for reading the DOM).
      list.dataset.filters = params.toString();
      if (!page.lines.length) updateCount();
      if (page.truncated) replace(notice, h('p', { class: 'hint' }, `Showing the newest ${FIRST_READ} matching lines.`));
    } catch (err) {
      if (err.name === 'AbortError' || mine !== generation) return;
      fail(mine, err);
      return;
    }
    follow(mine, params, signal);
  }

  async function follow(mine, params, signal) {
    const query = new URLSearchParams(params);
    query.set('since', String(lastSeq));
    let response;
    try {
      response = await authedFetch(`/gateway/logs/stream?${query}`, { signal, headers: { accept: 'text/event-stream' } });
      if (!response.ok) {
        const text = await response.text();
        let body = null;
        try { body = JSON.parse(text); } catch { /* not JSON */ }
        throw errorFrom(response, body);
      }
    } catch (err) {
      if (err.name === 'AbortError' || mine !== generation) return;
      fail(mine, err);
      return;
    }
    live.replaceChildren(h('span', { class: 'badge badge-ok' }, 'Live'));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || mine !== generation) break;
        buffer += value;
        let end;
        const batch = [];
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const event = parseEvent(block);
          if (event.name === 'line') {
            const line = JSON.parse(event.data);
            lastSeq = Math.max(lastSeq, line.seq);
            batch.push(line);
          } else if (event.name === 'skipped') {
            const { skipped } = JSON.parse(event.data);
            replace(notice, h('p', { class: 'alert alert-warn' }, `${skipped} lines came faster than this page could read them and were skipped. Download from the server log if you need every line.`));
          }
        }
        append(batch);
      }
    } catch (err) {
      if (err.name === 'AbortError' || mine !== generation) return;
    }
    if (mine !== generation || closed) return;
    // The stream ended (the gateway restarted or stopped): pick up where it was.
    live.textContent = 'Reconnecting…';
    retryTimer = setTimeout(() => follow(mine, params, signal), RETRY_MS);
  }

  function fail(mine, err) {
    live.textContent = 'Not connected';
    replace(notice, h('p', { class: 'alert alert-error' }, `Logs unavailable: ${err.message} Retrying…`));
    if (err.status === 401) return;
    retryTimer = setTimeout(() => { if (mine === generation && !closed) start(); }, RETRY_MS);
  }

  function parseEvent(block) {
    const event = { name: 'message', data: '' };
    for (const line of block.split('\n')) {
      if (line.startsWith('event: ')) event.name = line.slice(7);
      else if (line.startsWith('data: ')) event.data += line.slice(6);
    }
    return event;
  }

  pause.addEventListener('click', () => {
    paused = !paused;
    pause.setAttribute('aria-pressed', String(paused));
    if (paused) {
      pause.textContent = 'Resume';
    } else {
      pause.textContent = 'Pause';
      const lines = held;
      held = [];
      append(lines);
    }
  });

  download.addEventListener('click', () => {
    const text = shown.map(formatLine).join('\n') + (shown.length ? '\n' : '');
    const url = URL.createObjectURL(new Blob([text], { type: 'text/plain' }));
    const stamp = new Date().toISOString().replace(/[:.]/g, '-').slice(0, 19);
    const link = h('a', { href: url, download: `omni-logs-${stamp}.txt` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  });

  component.addEventListener('change', start);
  level.addEventListener('change', start);
  search.addEventListener('input', () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(start, 250);
  });

  replace(main, h('div', { class: 'container' },
    h('div', { class: 'page-head' },
      h('div', {}, h('h1', {}, 'Logs'), h('p', {}, 'The gateway\u2019s recent log: its own lines and those of PostgreSQL and the API worker. Secrets are hidden before they are kept.')),
      live),
    h('div', { class: 'card log-card' },
      h('div', { class: 'log-toolbar' },
        h('label', { class: 'log-field' }, h('span', { class: 'label' }, 'Component'), component),
        h('label', { class: 'log-field' }, h('span', { class: 'label' }, 'Level'), level),
        h('label', { class: 'log-field log-search' }, h('span', { class: 'label' }, 'Search'), search),
        h('div', { class: 'log-buttons' }, pause, download)),
      count,
      notice,
      scroller)));

  start();

  return () => {
    closed = true;
    generation += 1;
    if (controller) controller.abort();
    clearTimeout(retryTimer);
    clearTimeout(searchTimer);
    if (frame) cancelAnimationFrame(frame);
    clearTimeout(flushTimer);
  };
}
