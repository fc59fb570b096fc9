/** The server's API: /web/config and streamed /v1/chat/completions (server-sent events over fetch). */

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(key) {
  const out = { 'Content-Type': 'application/json' };
  if (key) out.Authorization = `Bearer ${key}`;  // a header, never the URL
  return out;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = body.error?.message || message;
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(response.status, message);
}

/** {model, vision, thinking, context, defaults} from the server; throws ApiError (401: a key is needed). */
export async function getConfig(key) {
  const response = await fetch('/web/config', { headers: headers(key), cache: 'no-store' });
  if (!response.ok) throw await failure(response);
  return response.json();
}

/** Yields the chunks of a streamed chat completion; aborting `signal` closes the connection, and the server
 * then aborts the request and frees its batch slot. */
export async function* streamChat(body, key, signal) {
  const response = await fetch('/v1/chat/completions', {
    method: 'POST', headers: headers(key), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split('\n')) {
        if (!line.startsWith('data:')) continue;
        const data = line.slice(5).trim();
        if (data === '[DONE]') return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message || 'the request failed');
        yield chunk;
      }
    }
  }
}
