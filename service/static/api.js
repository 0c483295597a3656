// The service's API as the page calls it: the optional API key, a retry on 503 with Retry-After (models still
// loading, or busy), and every failure turned into a ProblemError carrying an RFC 9457 problem.

const KEY_STORAGE = 'featuremap-api-key';
const MAX_ATTEMPTS = 4;
const MAX_RETRY_WAIT_S = 5;

let apiKey = '';

export class ProblemError extends Error {
  constructor(problem) {
    super(`${problem.title}: ${problem.detail ?? ''}`);
    this.problem = problem;
  }
}

export function setApiKey(key) {
  apiKey = key.trim();
  try {
    if (apiKey) sessionStorage.setItem(KEY_STORAGE, apiKey);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage can be disabled; the key then lasts as long as the page
  }
}

export function storedApiKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) ?? '';
  } catch {
    return '';
  }
}

function wait(seconds, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, seconds * 1000);
    signal?.addEventListener('abort', () => {
      clearTimeout(timer);
      reject(signal.reason);
    }, { once: true });
  });
}

/** The problem in an error response; a body that is not one (a proxy's HTML page, say) is described instead. */
async function problemOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body.title === 'string') return body;
  } catch {
    // not JSON: fall through
  }
  return {
    title: `HTTP ${response.status} ${response.statusText}`.trim(),
    status: response.status,
    detail: text.trim().slice(0, 300) || 'the server sent no explanation',
  };
}

/** Calls the API; resolves to the parsed JSON body, rejects with a ProblemError (or an AbortError). */
export async function callApi(path, { method = 'GET', body, signal } = {}) {
  for (let attempt = 1; ; attempt += 1) {
    const headers = { Accept: 'application/json' };
    if (apiKey) headers['X-API-Key'] = apiKey;
    let response;
    try {
      response = await fetch(path, { method, body, headers, signal });
    } catch (err) {
      if (err.name === 'AbortError') throw err;
      throw new ProblemError({ title: 'Network error', detail: `the service could not be reached (${err.message})` });
    }
    if (response.ok) return response.json();
    const retryAfter = Number(response.headers.get('Retry-After'));
    if (response.status === 503 && attempt < MAX_ATTEMPTS && Number.isFinite(retryAfter) && retryAfter > 0) {
      await wait(Math.min(retryAfter, MAX_RETRY_WAIT_S), signal);
      continue;
    }
    throw new ProblemError(await problemOf(response));
  }
}

/** A multipart body: the image file plus text fields (objects are sent as JSON). */
export function formWith(image, filename, fields = {}) {
  const form = new FormData();
  form.append('image', image, filename);
  for (const [name, value] of Object.entries(fields)) {
    form.append(name, typeof value === 'object' ? JSON.stringify(value) : String(value));
  }
  return form;
}
