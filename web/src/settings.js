/** Settings kept in this browser: system prompt, sampling (over the server's defaults), extra request fields,
 * thinking switch, theme and API key. Only what the user changed is stored; the rest follows the server. */

import { $ } from './dom.js';

const KEY = 'qwen35.settings';
const API_KEY = 'qwen35.apiKey';
const THEME = 'qwen35.theme';
export const SAMPLING = ['temperature', 'top_p', 'top_k', 'min_p', 'presence_penalty', 'frequency_penalty',
  'repetition_penalty', 'max_tokens'];

function load(name, fallback) {
  try {
    return JSON.parse(localStorage.getItem(name)) ?? fallback;
  } catch {
    return fallback;
  }
}

export class Settings {
  constructor() {
    this.defaults = {};
    this.overrides = load(KEY, {});
  }

  get(name) {
    return name in this.overrides ? this.overrides[name] : this.defaults[name];
  }

  set(name, value) {
    if (value === undefined || value === this.defaults[name]) delete this.overrides[name];
    else this.overrides[name] = value;
    localStorage.setItem(KEY, JSON.stringify(this.overrides));
  }

  get apiKey() { return localStorage.getItem(API_KEY) || ''; }

  set apiKey(value) {
    if (value) localStorage.setItem(API_KEY, value);
    else localStorage.removeItem(API_KEY);
  }

  /** The request fields these settings give (sampling, thinking switch, extra JSON on top). */
  requestFields() {
    const fields = {};
    for (const name of SAMPLING) {
      const value = this.get(name);
      if (typeof value === 'number' && Number.isFinite(value)) fields[name] = value;
    }
    fields.chat_template_kwargs = { enable_thinking: Boolean(this.get('thinking')) };
    return { ...fields, ...(this.get('extra') || {}) };
  }
}

export function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  localStorage.setItem(THEME, theme);
}

export function initialTheme() {
  return localStorage.getItem(THEME) || (matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light');
}

/** Wire the settings dialog to `settings`; `onChange` runs after a save. */
export function bindDialog(settings, onChange) {
  const dialog = $('#settings');
  const fill = () => {
    $('#set-system').value = settings.get('system') || '';
    for (const name of SAMPLING) $(`#set-${name}`).value = settings.get(name) ?? '';
    const extra = settings.get('extra');
    $('#set-extra').value = extra && Object.keys(extra).length ? JSON.stringify(extra) : '';
    $('#set-key').value = settings.apiKey;
  };
  $('#settings-open').addEventListener('click', () => { fill(); dialog.showModal(); });
  $('#settings-close').addEventListener('click', () => dialog.close());
  $('#settings-reset').addEventListener('click', () => {
    for (const name of [...SAMPLING, 'system', 'extra']) settings.set(name, undefined);
    fill();
  });
  $('#settings-save').addEventListener('click', () => {
    let extra = {};
    const raw = $('#set-extra').value.trim();
    if (raw) {
      try {
        extra = JSON.parse(raw);
        if (typeof extra !== 'object' || Array.isArray(extra) || extra === null) throw new Error('not an object');
      } catch (e) {
        $('#settings-note').textContent = `Extra request fields: not a JSON object (${e.message})`;
        return;
      }
    }
    settings.set('system', $('#set-system').value || undefined);
    for (const name of SAMPLING) {
      const text = $(`#set-${name}`).value.trim();
      settings.set(name, text === '' ? undefined : Number(text));
    }
    settings.set('extra', Object.keys(extra).length ? extra : undefined);
    settings.apiKey = $('#set-key').value.trim();
    dialog.close();
    onChange();
  });
}
