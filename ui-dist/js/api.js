// The one way the UI talks to the server: JSON in, JSON out, and every
// failure turned into an ApiError whose message is the API's `detail`
// (SPEC §5), so pages can show it as is.

export class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail);
    this.name = 'ApiError';
    /** HTTP status, or 0 when the server could not be reached. */
    this.status = status;
    /** The API's machine-readable slug, e.g. `invalid_api_key`. */
    this.code = code;
  }
}

/**
 * Calls `path` and returns the parsed JSON body (or null for an empty one).
 * `json` is sent as the request body; `headers` are added as given.
 */
export async function call(path, { method = 'GET', json, headers = {}, signal, keepalive = false } = {}) {
  const init = { method, headers: { accept: 'application/json', ...headers }, signal, keepalive };
  if (json !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new ApiError(0, 'unreachable', 'Cannot reach the Omni server. Check that it is running, then try again.');
  }
  return parse(response);
}

/** Parses a fetch response as call() does; exported for callers that need the raw fetch. */
export async function parse(response) {
  const text = await response.text();
  let body = null;
  if (text) {
    try {
      body = JSON.parse(text);
    } catch {
      body = null;
    }
  }
  if (!response.ok) {
    throw errorFrom(response, body);
  }
  return body;
}

export function errorFrom(response, body) {
  const detail = body && typeof body.detail === 'string' && body.detail
    ? sentence(body.detail)
    : `The server answered ${response.status} ${response.statusText || ''}`.trim() + '.';
  return new ApiError(response.status, body && body.code ? body.code : `http_${response.status}`, detail);
}

/** The API's detail as a sentence: capitalised, ending with a full stop. */
function sentence(text) {
  const trimmed = text.trim();
  const capitalised = trimmed.charAt(0).toUpperCase() + trimmed.slice(1);
  return /[.!?)]$/.test(capitalised) ? capitalised : `${capitalised}.`;
}
