/** Small DOM helpers: elements are built with properties, never from HTML strings. */

export const $ = (selector, root = document) => root.querySelector(selector);

/** h('button', {className: 'x', onclick}, 'text', child) -> element */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else el[key] = value;
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) el.append(child);
  }
  return el;
}

let noticeTimer = 0;

/** A short note at the top of the chat (errors, refusals); it fades after a while. */
export function notice(text, seconds = 8) {
  const el = $('#notice');
  el.textContent = text;
  el.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { el.hidden = true; }, seconds * 1000);
}
