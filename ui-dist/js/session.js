// Who is signed in, and the preferences that follow them.
//
// Signing in opens a server-side session whose token lives in an HttpOnly
// cookie (issue 15): scripts here never see it, and neither the password nor
// the API key is kept anywhere after the sign-in request. Every tab and
// every browser restart shares the cookie, so one sign-in serves them all.
// Every request sends `X-Omni-Client: ui`, which the server requires for
// cookie-authenticated changes (cross-site forms cannot send it).
//
// Preferences: signed in with an account, they belong to the account; on the
// sign-in page they belong to the tab's anonymous session id (a random UUID
// in sessionStorage, SPEC §6), whose theme carries over at sign-in. They are
// read once per page load as a list, not key by key.

import { ApiError, call } from './api.js';

const SESSION_ID = 'omni.sessionId';
export const CLIENT_HEADERS = { 'x-omni-client': 'ui' };

/**
 * A random UUID. crypto.randomUUID exists only in secure contexts (HTTPS,
 * localhost); over plain HTTP on another address, getRandomValues does.
 */
function uuid4() {
  if (typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** The tab's anonymous session id, created on first use. */
export function sessionId() {
  let id = sessionStorage.getItem(SESSION_ID);
  if (!id || !/^[0-9a-f-]{36}$/i.test(id)) {
    id = uuid4();
    sessionStorage.setItem(SESSION_ID, id);
  }
  return id;
}

function sessionHeaders() {
  return { 'x-session-id': sessionId(), ...CLIENT_HEADERS };
}

// ---------------------------------------------------------------- preferences

// This page load's preferences: a Promise of a Map, or undefined before the first read.
let preferences;

function loadPreferences() {
  if (!preferences) {
    preferences = call('/api/v1/preferences', { headers: sessionHeaders() })
      .then((list) => new Map((list || []).map(({ key, value }) => [key, value])))
      .catch((error) => {
        preferences = undefined;
        throw error;
      });
  }
  return preferences;
}

/** A preference, or null when it is not set. */
export async function getPreference(key) {
  const map = await loadPreferences();
  return map.has(key) ? map.get(key) : null;
}

export async function setPreference(key, value) {
  // keepalive: a click followed at once by a navigation still stores it.
  const stored = await call('/api/v1/preferences', { method: 'POST', json: { key, value }, headers: sessionHeaders(), keepalive: true });
  if (preferences) (await preferences.catch(() => new Map())).set(key, value);
  return stored;
}

export async function deletePreference(key) {
  try {
    await call(`/api/v1/preferences/${encodeURIComponent(key)}`, { method: 'DELETE', headers: sessionHeaders() });
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) throw error;
  }
  if (preferences) (await preferences.catch(() => new Map())).delete(key);
}

/** Forgets the preferences read so far (the owner changed: signed in or out). */
export function forgetPreferences() {
  preferences = undefined;
}

// ---------------------------------------------------------------- the signed-in account

// {username, role} of the signed-in account (username null for the API key),
// null when signed out, undefined before the first question to the server.
let current;
const channel = typeof BroadcastChannel === 'function' ? new BroadcastChannel('omni-session') : null;

/** Who is signed in, or null. */
export async function whoAmI({ fresh = false } = {}) {
  if (current === undefined || fresh) {
    try {
      // Not /auth/me: its 401 when signed out is an error in the console
      // on every first visit; this one answers "not signed in" with a 200.
      const state = await call('/api/v1/auth/session', { headers: CLIENT_HEADERS });
      current = state.signed_in ? state.account : null;
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) throw error;
      current = null;
    }
  }
  return current;
}

function signedIn(me) {
  current = me;
  forgetPreferences();
  channel?.postMessage('signed-in');
  window.dispatchEvent(new CustomEvent('omni:signed-in', { detail: me }));
  return me;
}

/** After a point-in-time restore rewound the sessions table: signed out, with why. */
export function signedOutAfterRestore(message) {
  signedOut(message);
}

function signedOut(message) {
  current = null;
  forgetPreferences();
  window.dispatchEvent(new CustomEvent('omni:signed-out', { detail: message }));
}

/** Signs in with a username and password; throws an ApiError with the API's reason. */
export async function login(username, password) {
  if (!username.trim() || !password) throw new ApiError(400, 'missing_credentials', 'Enter your username and password.');
  const me = await call('/api/v1/auth/login', { method: 'POST', json: { username: username.trim(), password }, headers: sessionHeaders() });
  return signedIn(me);
}

/** Signs in with the API key (the key is sent once and kept nowhere). */
export async function loginWithKey(key) {
  const trimmed = (key || '').trim();
  if (!trimmed) throw new ApiError(400, 'missing_api_key', 'Enter the API key.');
  const me = await call('/api/v1/auth/login', { method: 'POST', json: { api_key: trimmed }, headers: sessionHeaders() });
  return signedIn(me);
}

/** Called after onboarding created the admin account and its session. */
export function adoptSession(me) {
  return signedIn(me);
}

/** Ends this browser's session; every tab of it is signed out. */
export async function logout() {
  try {
    await call('/api/v1/auth/logout', { method: 'POST', headers: CLIENT_HEADERS });
  } finally {
    channel?.postMessage('signed-out');
    signedOut('You signed out.');
  }
}

/** Ends every session of the account, on every device. */
export async function logoutEverywhere() {
  try {
    await call('/api/v1/auth/logout-all', { method: 'POST', headers: CLIENT_HEADERS });
  } finally {
    channel?.postMessage('signed-out');
    signedOut('You signed out everywhere.');
  }
}

// Another tab signed in or out: follow it.
channel?.addEventListener('message', (event) => {
  if (event.data === 'signed-out') signedOut('You signed out in another tab.');
  if (event.data === 'signed-in') {
    forgetPreferences();
    whoAmI({ fresh: true }).then((me) => me && window.dispatchEvent(new CustomEvent('omni:signed-in', { detail: me }))).catch(() => {});
  }
});
// Coming back to a tab: the session may have ended meanwhile (another device, an admin).
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState !== 'visible' || !current) return;
  whoAmI({ fresh: true }).then((me) => { if (!me) signedOut('Your session has ended.'); }).catch(() => {});
});

/**
 * A call to a protected endpoint with the session cookie. A 401 means the
 * session ended: the tab is signed out and the error rethrown.
 */
export async function authedCall(path, options = {}) {
  try {
    return await call(path, { ...options, headers: { ...(options.headers || {}), ...CLIENT_HEADERS } });
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) signedOut(error.message);
    throw error;
  }
}

/** A raw fetch with the session cookie, for downloads and uploads. */
export async function authedFetch(path, init = {}) {
  const response = await fetch(path, { ...init, headers: { ...(init.headers || {}), ...CLIENT_HEADERS } });
  if (response.status === 401) signedOut('Your session has ended.');
  return response;
}
