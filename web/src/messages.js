/** One message on the page: user text (never parsed as HTML) with its images, or an assistant reply with its
 * live thinking block, rendered Markdown, per-reply stats and actions. */

import { h } from './dom.js';
import { renderMarkdown } from './render.js';

const seconds = (ms) => (ms < 10000 ? (ms / 1000).toFixed(1) : Math.round(ms / 1000)).toString();

/** "12 tokens · 41.3 tok/s · TTFT 0.21 s · cache 96/120" for a finished reply. */
export function statsText(stats) {
  if (!stats) return '';
  const parts = [`${stats.approx ? '≈' : ''}${stats.tokens} tokens`];
  if (stats.tokensPerSecond) parts.push(`${stats.tokensPerSecond.toFixed(1)} tok/s`);
  if (stats.ttftMs !== undefined) parts.push(`TTFT ${(stats.ttftMs / 1000).toFixed(2)} s`);
  if (stats.cached !== undefined && stats.promptTokens) {
    parts.push(`prefix cache ${stats.cached}/${stats.promptTokens} prompt tokens reused`);
  }
  return parts.join(' · ');
}

function userView(message, index, actions) {
  const images = (message.images || []).map((src) => h('img', { src, alt: 'attached image', className: 'thumb' }));
  return h('article', { className: 'msg user', dataset: { index } },
    images.length ? h('div', { className: 'images' }, images) : null,
    h('div', { className: 'content', textContent: message.content }),
    h('div', { className: 'actions' },
      h('button', { type: 'button', className: 'edit', textContent: 'Edit', onclick: () => actions.edit(index) })));
}

function assistantView(message, index, actions) {
  const summary = h('summary', {});
  const thinking = h('details', { className: 'thinking', hidden: true },
    summary, h('div', { className: 'thinking-body' }));
  return h('article', { className: 'msg assistant', dataset: { index, state: message.state || 'done' } },
    thinking,
    h('div', { className: 'content markdown' }),
    h('div', { className: 'error', hidden: true }),
    h('div', { className: 'actions' },
      h('span', { className: 'stats' }),
      h('button', { type: 'button', className: 'copy-reply', textContent: 'Copy', onclick: () => actions.copy(index) }),
      h('button', { type: 'button', className: 'regenerate', textContent: 'Regenerate',
        onclick: () => actions.regenerate(index) })));
}

/** Bring an assistant element up to date with its message (called while it streams, and once at the end). */
export function updateAssistant(el, message) {
  el.dataset.state = message.state || 'done';
  const details = el.querySelector('.thinking');
  if (message.thinking) {
    details.hidden = false;
    const summary = details.querySelector('summary');
    const body = details.querySelector('.thinking-body');
    if (message.thinkingMs === undefined) {
      const tail = message.thinking.trim().split('\n').pop().slice(-90);
      summary.textContent = `Thinking… ${tail}`;
    } else {
      summary.textContent = `Thought for ${seconds(message.thinkingMs)} s`;
    }
    body.textContent = message.thinking;
  }
  renderMarkdown(el.querySelector('.content'), message.content || '');
  const error = el.querySelector('.error');
  error.hidden = !message.error && message.state !== 'stopped';
  error.textContent = message.error || (message.state === 'stopped' ? 'Stopped.' : '');
  el.querySelector('.stats').textContent = statsText(message.stats);
}

/** The element for message `index` of a conversation; `actions` holds edit, regenerate and copy. */
export function messageView(message, index, actions) {
  if (message.role === 'user') return userView(message, index, actions);
  const el = assistantView(message, index, actions);
  updateAssistant(el, message);
  return el;
}

/** An inline editor replacing a user message's text: resolves to the new text, or null when cancelled. */
export function editInPlace(el, text) {
  return new Promise((resolve) => {
    const content = el.querySelector('.content');
    const area = h('textarea', { className: 'edit-area', value: text, rows: Math.min(12, text.split('\n').length + 1) });
    const done = (value) => { editor.remove(); content.hidden = false; resolve(value); };
    const editor = h('div', { className: 'editor' }, area,
      h('div', { className: 'actions' },
        h('button', { type: 'button', className: 'edit-send', textContent: 'Send', onclick: () => done(area.value) }),
        h('button', { type: 'button', className: 'edit-cancel', textContent: 'Cancel', onclick: () => done(null) })));
    content.hidden = true;
    content.after(editor);
    area.focus();
  });
}
