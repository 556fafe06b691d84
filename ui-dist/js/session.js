// The browser session: its id, the API key kept for it, and its preferences.
//
// The session id is a random UUID in sessionStorage, so it lives as long as
// the tab. Everything else (the API key, the theme) is kept server-side
// through the preferences API under that id (SPEC §6–§7); nothing goes to
// localStorage. Every helper is async because each one may ask the server.

import { ApiError, call } from './api.js';

const SESSION_ID = 'omni.sessionId';
const API_KEY_PREF = 'api_key';

/** The tab's session id, created on first use. */
export function sessionId() {
  let id = sessionStorage.getItem(SESSION_ID);
  if (!id || !/^[0-9a-f-]{36}$/i.test(id)) {
    id = crypto.randomUUID();
    sessionStorage.setItem(SESSION_ID, id);
  }
  return id;
}

function sessionHeaders() {
  return { 'x-session-id': sessionId() };
}

/** A preference of this session, or null when it is not set. */
export async function getPreference(key) {
  try {
    const body = await call(`/api/v1/preferences/${encodeURIComponent(key)}`, { headers: sessionHeaders() });
    return body ? body.value : null;
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) return null;
    throw error;
  }
}

export async function setPreference(key, value) {
  return call('/api/v1/preferences', { method: 'POST', json: { key, value }, headers: sessionHeaders() });
}

export async function deletePreference(key) {
  try {
    await call(`/api/v1/preferences/${encodeURIComponent(key)}`, { method: 'DELETE', headers: sessionHeaders() });
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) throw error;
  }
}

// Memory cache of the key for this page load; undefined means "not asked yet".
let cachedKey;

/** The API key kept for this session, or null when signed out. */
export async function getApiKey() {
  if (cachedKey === undefined) {
    cachedKey = await getPreference(API_KEY_PREF);
  }
  return cachedKey;
}

/**
 * Checks `key` against a protected endpoint; throws an ApiError carrying the
 * API's `detail` when it is refused.
 */
export async function validateApiKey(key) {
  const trimmed = (key || '').trim();
  if (!trimmed) throw new ApiError(400, 'missing_api_key', 'Enter the API key.');
  await call('/api/v1/migration/status', { headers: { 'x-api-key': trimmed } });
  return trimmed;
}

/** Validates `key`, then keeps it for this session. */
export async function login(key) {
  const valid = await validateApiKey(key);
  await setPreference(API_KEY_PREF, valid);
  cachedKey = valid;
  window.dispatchEvent(new CustomEvent('omni:signed-in'));
  return valid;
}

export async function logout() {
  cachedKey = null;
  await deletePreference(API_KEY_PREF);
}

/** Forgets the cached key so the next getApiKey() asks the server again. */
export function forgetCachedKey() {
  cachedKey = undefined;
}

/**
 * A call to a protected endpoint with the session's key. A 401 means the key
 * changed or was removed: the session is signed out and the error rethrown,
 * and the app sends the user to the login page.
 */
export async function authedCall(path, options = {}) {
  const key = await getApiKey();
  if (!key) throw new ApiError(401, 'missing_api_key', 'Sign in with the API key first.');
  try {
    return await call(path, { ...options, headers: { ...(options.headers || {}), 'x-api-key': key } });
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      await logout().catch(() => {});
      window.dispatchEvent(new CustomEvent('omni:signed-out', { detail: error.message }));
    }
    throw error;
  }
}

/** A raw fetch with the key, for downloads. */
export async function authedFetch(path, init = {}) {
  const key = await getApiKey();
  return fetch(path, { ...init, headers: { ...(init.headers || {}), 'x-api-key': key || '' } });
}
