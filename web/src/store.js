/** Conversations kept in this browser (IndexedDB), and their JSON export / import. */

const DB_NAME = 'qwen35-chat';
const STORE = 'conversations';
const FORMAT = 'qwen35-chat';

let opened = null;

function db() {
  opened ??= new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE, { keyPath: 'id' });
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return opened;
}

async function run(mode, action) {
  const database = await db();
  return new Promise((resolve, reject) => {
    const tx = database.transaction(STORE, mode);
    const request = action(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(request?.result);
    tx.onerror = () => reject(tx.error);
  });
}

export const newId = () => `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

export function newConversation() {
  const now = Date.now();
  return { id: newId(), title: 'New chat', created: now, updated: now, messages: [] };
}

/** Every conversation, the most recently changed first. */
export async function list() {
  const all = (await run('readonly', (s) => s.getAll())) || [];
  return all.sort((a, b) => b.updated - a.updated);
}

export const save = (conversation) => run('readwrite', (s) => s.put(structuredClone(conversation)));
export const remove = (id) => run('readwrite', (s) => s.delete(id));

/** Does the conversation match a search (title or any message text, case-insensitive)? */
export function matches(conversation, query) {
  const q = query.trim().toLowerCase();
  if (!q) return true;
  return conversation.title.toLowerCase().includes(q)
    || conversation.messages.some((m) => (m.content || '').toLowerCase().includes(q));
}

export function exportJson(conversations) {
  return JSON.stringify({ format: FORMAT, version: 1, exported: new Date().toISOString(), conversations }, null, 2);
}

function validMessage(m) {
  return m && (m.role === 'user' || m.role === 'assistant') && typeof m.content === 'string';
}

/** Conversations from an export (checked; an id already here gets a new one). Throws on a file that is not one. */
export function parseImport(text, existingIds) {
  const data = JSON.parse(text);
  if (data?.format !== FORMAT || !Array.isArray(data.conversations)) {
    throw new Error('not a qwen35 chat export (expected {"format": "qwen35-chat", "conversations": [...]})');
  }
  return data.conversations.filter((c) => c && typeof c.title === 'string' && Array.isArray(c.messages)
    && c.messages.every(validMessage)).map((c) => ({
    id: typeof c.id === 'string' && !existingIds.has(c.id) ? c.id : newId(),
    title: c.title.slice(0, 200),
    created: Number(c.created) || Date.now(),
    updated: Number(c.updated) || Date.now(),
    messages: c.messages.map((m) => ({ ...m, images: Array.isArray(m.images) ? m.images.filter(
      (u) => typeof u === 'string' && u.startsWith('data:image/')) : undefined })),
  }));
}
