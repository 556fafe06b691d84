// Onboarding "Storage Configuration": choose storage, review, save, then the
// step that creates the admin account (POST /setup/admin, which signs this
// browser in), shows the API key once for scripts, and completes setup
// (SPEC §6: POST /setup/initialize and POST /setup/complete). Validation here mirrors the server's so mistakes are
// caught early; the server validates again and its `detail` is shown as is.
//
// Until setup completes, the server accepts these calls only with the
// one-time setup token (header X-Omni-Setup-Token) or from the machine
// itself. The gateway logs the token and a link `…/setup#token=…`; opened
// from that link, the token field is filled in and the token leaves the
// address bar at once (kept in this tab's sessionStorage only).

import { ApiError, call } from '../api.js';
import { h, replace } from '../dom.js';
import { adoptSession, authedCall, sessionId } from '../session.js';

const DEFAULT_DATA_DIR = './data/postgres';
const TOKEN_KEY = 'omni.setupToken';

/** The setup token from the link's fragment (`#token=…`), else the one this tab kept. */
function initialToken() {
  const match = /(?:^#|&)token=([^&]*)/.exec(location.hash || '');
  if (match) {
    const token = decodeURIComponent(match[1]);
    try { sessionStorage.setItem(TOKEN_KEY, token); } catch { /* private mode: kept in memory only */ }
    history.replaceState(history.state, '', location.pathname + location.search);
    return token;
  }
  try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch { return ''; }
}

const STEPS = [['storage', 'Storage'], ['summary', 'Review'], ['key', 'Admin account'], ['done', 'Done']];

/** Whether the server accepts an external database URL in the setup form. */
async function acceptsDatabaseUrl() {
  try {
    const doc = await call('/api/v1/openapi.json');
    const schema = doc && doc.components && doc.components.schemas && doc.components.schemas.StorageSettings;
    return Boolean(schema && schema.properties && schema.properties.database_url);
  } catch {
    return false;
  }
}

/**
 * The storage the running gateway uses and where its data directory came
 * from (GET /gateway/status `storage`), as a sentence; null when unknown.
 */
async function effectiveStorage() {
  try {
    const status = await call('/gateway/status');
    const storage = status && status.storage;
    if (!storage) return null;
    if (storage.kind === 'external') return 'an external PostgreSQL (DATABASE_URL)';
    if (storage.kind === 'memory') return 'an in-memory PostgreSQL (data lost at exit)';
    const origin = storage.data_dir_origin === 'default' ? 'the default' : `set by ${storage.data_dir_origin}`;
    return `an embedded PostgreSQL in ${storage.data_dir} (${origin})`;
  } catch {
    return null;
  }
}

function hasControl(text) {
  // eslint-disable-next-line no-control-regex
  return /[\u0000-\u001f\u007f]/.test(text);
}

/** Why `value` is not a usable postgres:// URL, or null. */
export function postgresUrlProblem(value, label) {
  const text = (value || '').trim();
  const example = 'e.g. postgres://user:password@db.example.com:5432/omni';
  if (!text) return `${label} is required (${example}).`;
  if (!/^postgres(ql)?:\/\//i.test(text)) return `${label} must start with postgres:// or postgresql:// (${example}).`;
  if (hasControl(text)) return `${label} must not contain control characters.`;
  let url;
  try {
    url = new URL(text);
  } catch {
    return `${label} is not a valid URL (${example}).`;
  }
  if (!url.hostname) return `${label} needs a host name (${example}).`;
  if (url.port && !(Number(url.port) > 0 && Number(url.port) < 65536)) return `${label} has an invalid port.`;
  return null;
}

function mask(url) {
  return (url || '').replace(/^([a-z]+:\/\/[^:/@]+:)[^@/]*@/i, '$1***@');
}

function initialState(saved) {
  const usable = (url) => (url && !url.includes(':***@') ? url : '');
  const storage = saved || {};
  return {
    step: 'storage',
    mode: storage.database_url ? 'external' : storage.memory_mode ? 'memory' : 'filesystem',
    data_dir: storage.data_dir || DEFAULT_DATA_DIR,
    database_url: usable(storage.database_url),
    replication_enabled: Boolean(storage.replication_enabled),
    replication_url: usable(storage.replication_url),
    replication_databases: storage.replication_databases || '',
    redis_enabled: Boolean(storage.redis_enabled),
    redis_url: usable(storage.redis_url),
    redis_prefix_key: storage.redis_prefix_key || '',
    redis_ttl: storage.redis_ttl === null || storage.redis_ttl === undefined ? '' : String(storage.redis_ttl),
    redis_save_instances: Boolean(storage.redis_save_instances),
    result: null,
    skipped: false,
  };
}

/** Field → problem, for every field that is wrong. */
function validate(s) {
  const problems = {};
  if (s.mode === 'filesystem') {
    const dir = s.data_dir.trim();
    if (!dir) problems.data_dir = 'Enter the data directory, e.g. ./data/postgres.';
    else if (dir.length > 4096 || hasControl(dir)) problems.data_dir = 'The data directory must be a path of at most 4096 characters.';
  }
  if (s.mode === 'external') {
    const problem = postgresUrlProblem(s.database_url, 'The database URL');
    if (problem) problems.database_url = problem;
  }
  if (s.replication_enabled) {
    const problem = postgresUrlProblem(s.replication_url, 'The replication URL');
    if (problem) problems.replication_url = problem;
  }
  const dbs = s.replication_databases.trim();
  if (dbs && !dbs.split(',').map((d) => d.trim()).every((d) => /^[A-Za-z0-9_*-]{1,63}$/.test(d))) {
    problems.replication_databases = 'List database names separated by commas (letters, digits, _ - and * wildcards).';
  }
  if (s.redis_enabled) {
    const url = s.redis_url.trim();
    if (!/^rediss?:\/\/.+/i.test(url) || hasControl(url)) problems.redis_url = 'The Redis URL must start with redis:// or rediss://, e.g. redis://localhost:6379/0.';
  }
  if (s.redis_prefix_key.length > 256 || hasControl(s.redis_prefix_key)) {
    problems.redis_prefix_key = 'The key prefix is at most 256 characters.';
  }
  if (s.redis_ttl.trim() && !/^\d+$/.test(s.redis_ttl.trim())) {
    problems.redis_ttl = 'The TTL is a whole number of seconds, zero or more.';
  }
  return problems;
}

/** The JSON body of POST /setup/initialize. */
function payload(s, withDatabaseUrl) {
  const text = (v) => (v.trim() ? v.trim() : null);
  const body = {
    data_dir: s.mode === 'filesystem' ? s.data_dir.trim() : (s.data_dir.trim() || DEFAULT_DATA_DIR),
    memory_mode: s.mode === 'memory',
    replication_enabled: s.replication_enabled,
    replication_url: s.replication_enabled ? text(s.replication_url) : null,
    replication_databases: s.replication_enabled ? text(s.replication_databases) : null,
    redis_enabled: s.redis_enabled,
    redis_url: s.redis_enabled ? text(s.redis_url) : null,
    redis_prefix_key: s.redis_enabled ? text(s.redis_prefix_key) : null,
    redis_ttl: s.redis_enabled && s.redis_ttl.trim() ? Number(s.redis_ttl.trim()) : null,
    redis_save_instances: s.redis_enabled ? s.redis_save_instances : null,
  };
  if (withDatabaseUrl && s.mode === 'external') body.database_url = s.database_url.trim();
  return body;
}

function stepList(current) {
  return h('ol', { class: 'steps', 'aria-label': 'Setup progress' },
    STEPS.map(([id, label]) => h('li', { 'aria-current': id === current ? 'step' : false }, label)));
}

function restartCallout(result) {
  if (!result) return null;
  return result.restart_required
    ? h('div', { class: 'alert alert-warn', role: 'status', id: 'restart-required' },
      h('strong', {}, 'Restart required'),
      result.message || 'Restart Omni for the new storage settings to take effect.')
    : h('div', { class: 'alert alert-ok', role: 'status' }, result.message || 'Storage settings saved.');
}

export async function render(main, { navigate, me, setup }) {
  const requiresSetup = !setup || setup.requires_setup;
  const outer = h('div', { class: 'container narrow' });
  const container = h('div');
  replace(main, outer);
  let token = requiresSetup ? initialToken() : '';
  if (requiresSetup && !me) {
    const tokenInput = h('input', {
      id: 'setup-token', name: 'setup-token', type: 'password', autocomplete: 'off', spellcheck: 'false', value: token,
      'aria-describedby': 'setup-token-hint',
      oninput: () => {
        token = tokenInput.value.trim();
        try { sessionStorage.setItem(TOKEN_KEY, token); } catch { /* kept in memory only */ }
      },
    });
    outer.append(h('section', { class: 'card', id: 'setup-token-card' },
      h('div', { class: 'field' },
        h('label', { for: 'setup-token' }, 'Setup token'),
        tokenInput,
        h('p', { class: 'hint', id: 'setup-token-hint' },
          'Only the operator may set Omni up. The gateway prints the token in its log at start (the line "setup token: …", with a link that fills it in), and omni-gateway doctor shows it. Not needed in a browser on the server itself.'))));
  }
  outer.append(container);

  /** Headers that carry the setup token, when there is one. */
  function tokenHeaders() {
    return token ? { 'x-omni-setup-token': token } : {};
  }

  if (!me && !requiresSetup) {
    replace(container,
      h('h1', {}, 'Storage configuration'),
      h('div', { class: 'alert alert-info' }, 'Setup is already complete. Sign in to review the storage settings.'),
      h('a', { class: 'btn btn-primary', href: '/login' }, 'Sign in'));
    return;
  }

  const [databaseUrlAccepted, inEffect] = await Promise.all([acceptsDatabaseUrl(), effectiveStorage()]);
  const s = initialState(setup && setup.storage);
  let key = null;
  let signedIn = me;

  /**
   * On first run, the generated key, shown until setup completes by the
   * start that generated it (null when this start did not); memory only.
   */
  async function setupKey() {
    if (key) return key;
    try {
      const body = await call('/api/v1/setup/api-key', { headers: tokenHeaders() });
      key = body.api_key;
    } catch (err) {
      if (err instanceof ApiError && (err.code === 'api_key_not_shown' || err.code === 'api_key_configured')) return null;
      throw err;
    }
    return key;
  }

  /** A protected setup call: with the session once signed in, else (first run) with the setup token. */
  async function protectedCall(path, options = {}) {
    if (signedIn) return authedCall(path, options);
    return call(path, { ...options, headers: { ...(options.headers || {}), ...tokenHeaders() } });
  }

  function show(step) {
    s.step = step;
    ({ storage: storageStep, summary: summaryStep, key: keyStep, done: doneStep })[step]();
    const heading = container.querySelector('h1, h2');
    if (heading) { heading.setAttribute('tabindex', '-1'); heading.focus({ preventScroll: false }); }
  }

  // ---------------------------------------------------------------- step 1
  function storageStep() {
    const errors = h('div', { class: 'alert alert-error', role: 'alert', id: 'setup-error' });

    function input(name, label, attrs = {}, hint = null) {
      const hintId = `${name}-hint`;
      const errorId = `${name}-error`;
      const el = h('input', {
        id: name,
        name,
        type: attrs.type || 'text',
        value: s[name],
        autocomplete: 'off',
        spellcheck: 'false',
        'aria-describedby': [hint ? hintId : null, errorId].filter(Boolean).join(' '),
        ...attrs,
        oninput: (event) => { s[name] = event.target.value; },
      });
      return h('div', { class: 'field' },
        h('label', { for: name }, label),
        el,
        hint ? h('p', { class: 'hint', id: hintId }, hint) : null,
        h('p', { class: 'field-error', id: errorId, hidden: true }));
    }

    function checkbox(name, label, onchange) {
      return h('div', { class: 'check' },
        h('input', {
          type: 'checkbox',
          id: name,
          name,
          checked: s[name],
          onchange: (event) => { s[name] = event.target.checked; if (onchange) onchange(); },
        }),
        h('label', { for: name }, label));
    }

    function option(value, title, description) {
      return h('label', { class: 'option' },
        h('input', {
          type: 'radio',
          name: 'storage_mode',
          value,
          checked: s.mode === value,
          onchange: () => { s.mode = value; syncMode(); },
        }),
        h('div', {}, h('strong', {}, title), h('span', {}, description)));
    }

    const filesystem = h('div', { id: 'mode-filesystem' },
      input('data_dir', 'Data directory', {}, 'Relative paths are resolved against the directory Omni starts in.'));
    const memory = h('div', { id: 'mode-memory' },
      h('div', { class: 'alert alert-warn', role: 'note', id: 'memory-warning' },
        h('strong', {}, 'Data loss warning'),
        'In-memory storage is deleted every time Omni stops or restarts. Use it only for trials and tests.'));
    const external = h('div', { id: 'mode-external' },
      input('database_url', 'PostgreSQL URL', { type: 'url', placeholder: 'postgres://user:password@db.example.com:5432/omni' },
        databaseUrlAccepted
          ? 'Omni connects to this server instead of running its own PostgreSQL.'
          : 'This server reads an external database from the DATABASE_URL environment variable; the review step shows the line to add.'));

    function syncMode() {
      filesystem.hidden = s.mode !== 'filesystem';
      memory.hidden = s.mode !== 'memory';
      external.hidden = s.mode !== 'external';
    }

    const replicationFields = h('div', { id: 'replication-fields' },
      input('replication_url', 'Replication target URL', { type: 'url', placeholder: 'postgres://user:password@replica.example.com:5432/postgres' }),
      input('replication_databases', 'Databases to replicate', { placeholder: 'omni, app_*' }, 'Comma-separated names; * is a wildcard. Empty means the Omni database.'));
    const redisFields = h('div', { id: 'redis-fields' },
      input('redis_url', 'Redis URL', { type: 'url', placeholder: 'redis://localhost:6379/0' }),
      input('redis_prefix_key', 'Key prefix', { placeholder: 'omni:' }),
      input('redis_ttl', 'Cache lifetime (seconds)', { type: 'number', min: '0', step: '1', inputmode: 'numeric' }),
      checkbox('redis_save_instances', 'Cache instance data in Redis'));
    const syncToggles = () => {
      replicationFields.hidden = !s.replication_enabled;
      redisFields.hidden = !s.redis_enabled;
    };

    const form = h('form', {
      novalidate: true,
      onsubmit: (event) => {
        event.preventDefault();
        for (const el of form.querySelectorAll('.field-error')) { el.hidden = true; el.textContent = ''; }
        for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
        const found = validate(s);
        const names = Object.keys(found);
        if (names.length) {
          for (const name of names) {
            const field = form.querySelector(`#${name}`);
            const message = form.querySelector(`#${name}-error`);
            if (field) field.setAttribute('aria-invalid', 'true');
            if (message) { message.textContent = found[name]; message.hidden = false; }
            const section = field && field.closest('details');
            if (section) section.open = true;
          }
          replace(errors, names.length === 1
            ? 'Please correct the highlighted field.'
            : `Please correct the ${names.length} highlighted fields.`);
          const first = form.querySelector(`#${names[0]}`);
          if (first) first.focus();
          return;
        }
        replace(errors);
        show('summary');
      },
    },
    h('fieldset', {},
      h('legend', {}, 'Where should Omni keep its data?'),
      h('div', { class: 'options' },
        option('filesystem', 'Filesystem (recommended)', 'An embedded PostgreSQL keeps its data in a directory on this machine.'),
        option('memory', 'In memory', 'Fast and disposable: nothing is kept when Omni stops.'),
        option('external', 'External PostgreSQL', 'Use a PostgreSQL server you already run (managed or self-hosted).'))),
    filesystem, memory, external,
    h('details', { class: 'section', id: 'replication-section', open: s.replication_enabled },
      h('summary', {}, 'Replication'),
      h('div', { class: 'section-body' },
        h('p', { class: 'hint' }, 'Copy the embedded databases to an external PostgreSQL with logical replication.'),
        checkbox('replication_enabled', 'Enable replication', syncToggles),
        replicationFields)),
    h('details', { class: 'section', id: 'redis-section', open: s.redis_enabled },
      h('summary', {}, 'Redis cache'),
      h('div', { class: 'section-body' },
        checkbox('redis_enabled', 'Enable Redis', syncToggles),
        redisFields)),
    errors,
    h('div', { class: 'actions' },
      h('button', { type: 'submit', class: 'btn btn-primary' }, 'Review settings'),
      requiresSetup
        ? h('button', {
          type: 'button',
          class: 'btn',
          id: 'skip-setup',
          onclick: () => { s.skipped = true; s.result = null; show('key'); },
        }, 'Skip – use default storage')
        : h('a', { class: 'btn', href: '/' }, 'Cancel')));

    replace(container,
      stepList('storage'),
      h('h1', {}, 'Storage Configuration'),
      h('p', { class: 'hint' }, requiresSetup
        ? `Choose where Omni stores its data. You can skip this and keep what runs now: ${inEffect || 'an embedded PostgreSQL in ./data/postgres'}.`
        : 'Setup is complete. Changes apply the next time Omni starts; environment variables still take precedence.'),
      h('section', { class: 'card' }, form));
    syncMode();
    syncToggles();
  }

  // ---------------------------------------------------------------- step 2
  function summaryStep() {
    const error = h('div', { class: 'alert alert-error', role: 'alert', id: 'setup-error' });
    const body = payload(s, databaseUrlAccepted);
    const rows = [
      ['Storage', { filesystem: 'Filesystem (embedded PostgreSQL)', memory: 'In memory (data lost at exit)', external: 'External PostgreSQL' }[s.mode]],
    ];
    if (s.mode === 'filesystem') rows.push(['Data directory', body.data_dir]);
    if (s.mode === 'external') rows.push(['Database URL', mask(s.database_url.trim())]);
    if (inEffect) rows.push(['In effect now', inEffect]);
    rows.push(['Replication', s.replication_enabled ? 'Enabled' : 'Off']);
    if (s.replication_enabled) {
      rows.push(['Replication target', mask(body.replication_url)]);
      rows.push(['Databases', body.replication_databases || 'the Omni database']);
    }
    rows.push(['Redis', s.redis_enabled ? 'Enabled' : 'Off']);
    if (s.redis_enabled) {
      rows.push(['Redis URL', mask(body.redis_url)]);
      if (body.redis_prefix_key) rows.push(['Key prefix', body.redis_prefix_key]);
      if (body.redis_ttl !== null) rows.push(['Cache lifetime', `${body.redis_ttl} s`]);
      rows.push(['Cache instances', body.redis_save_instances ? 'Yes' : 'No']);
    }

    const save = h('button', {
      type: 'button',
      class: 'btn btn-primary',
      id: 'save-settings',
      onclick: async () => {
        save.disabled = true;
        save.textContent = 'Saving…';
        replace(error);
        try {
          s.result = await protectedCall('/api/v1/setup/initialize', { method: 'POST', json: body });
          show(requiresSetup ? 'key' : 'done');
        } catch (err) {
          replace(error, err instanceof ApiError && err.code === 'setup_complete'
            ? 'Setup is already complete on this server; sign in to change the storage settings.'
            : err.message);
          save.disabled = false;
          save.textContent = 'Save settings';
        }
      },
    }, 'Save settings');

    replace(container,
      stepList('summary'),
      h('h1', {}, 'Review storage settings'),
      h('section', { class: 'card' },
        h('dl', { class: 'summary', id: 'setup-summary' }, rows.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])),
        s.mode === 'memory'
          ? h('div', { class: 'alert alert-warn' }, h('strong', {}, 'Data loss warning'), 'Everything is deleted when Omni stops.')
          : null,
        s.mode === 'external' && !databaseUrlAccepted
          ? h('div', { class: 'alert alert-info', id: 'database-url-instructions' },
            h('strong', {}, 'One more step for an external database'),
            'Add this line to the .env file next to Omni (or its environment), then restart:',
            h('pre', { class: 'mono' }, `DATABASE_URL=${s.database_url.trim()}`))
          : null,
        h('p', { class: 'hint' }, 'Settings take effect the next time Omni starts; environment variables still take precedence.'),
        error,
        h('div', { class: 'actions' },
          save,
          h('button', { type: 'button', class: 'btn', onclick: () => show('storage') }, 'Back'))));
  }

  // ---------------------------------------------------------------- step 3
  async function keyStep() {
    const title = 'Create the admin account';
    const error = h('div', { class: 'alert alert-error', role: 'alert', id: 'setup-error' });
    replace(container, stepList('key'), h('h1', {}, title), h('p', { class: 'loading' }, 'Loading…'));
    let shown = null;
    try {
      shown = await setupKey();
    } catch (err) {
      if (!signedIn) {
        replace(container, stepList('key'), h('h1', {}, title),
          h('div', { class: 'alert alert-error', role: 'alert', id: 'setup-error' }, err.message),
          h('div', { class: 'actions' },
            h('button', { type: 'button', class: 'btn btn-primary', onclick: () => show('key') }, 'Try again'),
            h('a', { class: 'btn', href: '/login' }, 'Sign in')));
        return;
      }
    }
    const needsAccount = !signedIn && !(setup && setup.admin_created);
    const accountField = (id, label, attrs, hint) => h('div', { class: 'field' },
      h('label', { for: id }, label),
      h('input', { id, name: id, required: true, spellcheck: 'false', ...attrs, ...(hint ? { 'aria-describedby': `${id}-hint` } : {}) }),
      hint ? h('p', { class: 'hint', id: `${id}-hint` }, hint) : null);
    const accountFields = needsAccount
      ? h('fieldset', { class: 'field-group' },
        h('legend', {}, 'Admin account'),
        accountField('admin-username', 'Username', { type: 'text', autocomplete: 'username', autocapitalize: 'none', value: 'admin' },
          '1–64 characters: lower-case letters, digits, _ . - (starting with a letter or digit).'),
        accountField('admin-password', 'Password', { type: 'password', autocomplete: 'new-password', minlength: 8 }, 'At least 8 characters.'),
        accountField('admin-password-again', 'Repeat the password', { type: 'password', autocomplete: 'new-password' }))
      : h('p', { class: 'alert alert-info' }, signedIn
        ? `Signed in as ${signedIn.username || 'the API key'}.`
        : 'The admin account exists already; sign in with it to finish.');
    const copied = h('span', { role: 'status', class: 'hint' });
    const keyInput = shown ? h('input', { id: 'generated-key', type: 'text', readonly: true, value: shown, 'aria-describedby': 'key-hint' }) : null;
    const finish = h('button', {
      type: 'button',
      class: 'btn btn-primary',
      id: 'finish-setup',
      onclick: async () => {
        replace(error);
        if (needsAccount) {
          const username = container.querySelector('#admin-username').value.trim();
          const password = container.querySelector('#admin-password').value;
          const again = container.querySelector('#admin-password-again').value;
          if (!/^[a-z0-9][a-z0-9_.-]{0,63}$/.test(username)) { replace(error, 'The username is 1–64 characters of a-z 0-9 _ . - and starts with a letter or digit.'); return; }
          if (password.length < 8) { replace(error, 'The password needs at least 8 characters.'); return; }
          if (password !== again) { replace(error, 'The two passwords differ.'); return; }
          finish.disabled = true;
          try {
            const created = await call('/api/v1/setup/admin', {
              method: 'POST',
              json: { username, password },
              headers: { 'x-session-id': sessionId(), 'x-omni-client': 'ui', ...tokenHeaders() },
            });
            signedIn = adoptSession(created);
          } catch (err) {
            replace(error, err.message);
            finish.disabled = false;
            return;
          }
          // Creating the first admin completed setup; the token is spent.
          try { sessionStorage.removeItem(TOKEN_KEY); } catch { /* nothing kept */ }
          const card = outer.querySelector('#setup-token-card');
          if (card) card.remove();
          show('done');
          return;
        } else if (!signedIn) {
          navigate('/login');
          return;
        }
        finish.disabled = true;
        try {
          await protectedCall('/api/v1/setup/complete', { method: 'POST' });
          show('done');
        } catch (err) {
          replace(error, err.message);
          finish.disabled = false;
        }
      },
    }, 'Finish setup');

    replace(container,
      stepList('key'),
      h('h1', {}, title),
      restartCallout(s.result),
      s.skipped ? h('div', { class: 'alert alert-info', role: 'status', id: 'storage-kept' }, `Storage kept as it runs now: ${inEffect || 'an embedded PostgreSQL in ./data/postgres'}.`) : null,
      h('section', { class: 'card' },
        accountFields,
        keyInput ? h('div', { class: 'field' },
          h('label', { for: 'generated-key' }, 'API key'),
          h('div', { class: 'key-box' },
            keyInput,
            h('button', {
              type: 'button',
              class: 'btn',
              onclick: async () => {
                keyInput.select();
                try {
                  await navigator.clipboard.writeText(shown);
                  copied.textContent = 'Copied.';
                } catch {
                  copied.textContent = 'Press Ctrl+C to copy the selected key.';
                }
              },
            }, 'Copy')),
          h('p', { class: 'hint', id: 'key-hint' },
            'For scripts and API clients: they send it in the x-api-key header. Keep it safe: it is no longer shown once setup is complete. People sign in with their account.'),
          copied) : null,
        error,
        h('div', { class: 'actions' },
          finish,
          h('button', { type: 'button', class: 'btn', onclick: () => show('storage') }, 'Back'))));
  }

  // ---------------------------------------------------------------- step 4
  function doneStep() {
    replace(container,
      stepList('done'),
      h('h1', {}, requiresSetup ? 'Setup complete' : 'Storage settings saved'),
      restartCallout(s.result),
      h('div', { class: 'alert alert-ok', role: 'status', id: 'setup-done' },
        requiresSetup ? 'Omni is ready. You are signed in with the admin account in this browser.' : 'The new settings are stored.'),
      h('div', { class: 'actions' },
        h('button', { type: 'button', class: 'btn btn-primary', onclick: () => navigate('/') }, 'Go to the dashboard')));
  }

  show('storage');
}
