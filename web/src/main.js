/** The chat page: wires the composer, the message list, the conversation list and the settings together, and
 * runs one streamed reply at a time. */

import { $, notice } from './dom.js';
import { ApiError, getConfig, streamChat } from './api.js';
import { Attachments } from './attach.js';
import { editInPlace, messageView, updateAssistant } from './messages.js';
import { copyText, onCodeCopy } from './render.js';
import { Settings, applyTheme, bindDialog, initialTheme } from './settings.js';
import { Sidebar } from './sidebar.js';
import * as store from './store.js';

const settings = new Settings();
const attachments = new Attachments($('#attachments'));
let config = null;
let conversation = store.newConversation();
let busy = null;  // {controller, message, el} while a reply streams
const empty = $('#empty');

const app = {
  currentId: () => conversation.id,
  open(c) {
    stop();
    conversation = c ? structuredClone(c) : store.newConversation();
    $('#app').dataset.sidebar = 'closed';
    renderConversation();
    sidebar.render();
  },
  renamed(c) { if (c.id === conversation.id) conversation.title = c.title; $('#title').textContent = c.title; },
};
const sidebar = new Sidebar(app);

// -- conversation --------------------------------------------------------------------------------------------
const actions = {
  edit: async (index) => {
    const message = conversation.messages[index];
    const el = $(`#messages .msg[data-index="${index}"]`);
    const text = await editInPlace(el, message.content);
    if (text === null || !text.trim()) return;
    stop();
    conversation.messages = conversation.messages.slice(0, index);
    await send(text, message.images || []);
  },
  regenerate: async (index) => {
    stop();
    conversation.messages = conversation.messages.slice(0, index);
    renderConversation();
    await generate();
  },
  copy: async (index) => {
    notice((await copyText(conversation.messages[index].content)) ? 'Copied the reply.' : 'Could not copy.', 2);
  },
};

function renderConversation() {
  const list = $('#messages');
  list.replaceChildren(...conversation.messages.map((m, i) => messageView(m, i, actions)));
  if (!conversation.messages.length) list.append(empty);
  $('#title').textContent = conversation.messages.length ? conversation.title : 'qwen35';
  list.scrollTop = list.scrollHeight;
}

async function persist() {
  if (!conversation.messages.length) return;
  conversation.updated = Date.now();
  await store.save(conversation);
  await sidebar.refresh();
}

function requestMessages() {
  const out = [];
  const system = settings.get('system');
  if (system) out.push({ role: 'system', content: system });
  for (const m of conversation.messages) {
    if (m.role === 'user' && m.images?.length) {
      out.push({ role: 'user', content: [{ type: 'text', text: m.content },
        ...m.images.map((url) => ({ type: 'image_url', image_url: { url } }))] });
    } else if (m.role === 'user' || m.content) {
      out.push({ role: m.role, content: m.content });
    }
  }
  return out;
}

async function send(text, images) {
  if (busy || !config) return;
  if (images.length && !config.vision) {
    await attachments.add([]);
    return;
  }
  if (!conversation.messages.length) conversation.title = text.trim().split('\n')[0].slice(0, 60) || 'New chat';
  conversation.messages.push({ role: 'user', content: text, images: images.length ? images : undefined });
  renderConversation();
  await persist();
  await generate();
}

/** Stream a reply to the conversation so far, into a new assistant message. */
async function generate() {
  const message = { role: 'assistant', content: '', thinking: '', state: 'streaming' };
  const body = { model: config.model, messages: requestMessages(), stream: true,
    stream_options: { include_usage: true }, ...settings.requestFields() };
  conversation.messages.push(message);
  renderConversation();
  const el = $('#messages').lastElementChild;
  const controller = new AbortController();
  busy = { controller, message, el };
  setBusy(true);
  const started = performance.now();
  let first = null;
  let thinkingStart = null;
  let pieces = 0;
  let usage = null;
  let pending = false;
  const refresh = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; updateAssistant(el, message); follow(); });
  };
  try {
    for await (const chunk of streamChat(body, settings.apiKey, controller.signal)) {
      usage = chunk.usage || usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        const now = performance.now();
        if (delta.reasoning_content) {
          thinkingStart ??= now;
          message.thinking += delta.reasoning_content;
        }
        if (delta.content) {
          if (thinkingStart !== null && message.thinkingMs === undefined) message.thinkingMs = now - thinkingStart;
          message.content += delta.content;
        }
        if (delta.reasoning_content || delta.content) {
          first ??= now;
          pieces += 1;
        }
        if (choice.finish_reason) message.finish = choice.finish_reason;
      }
      refresh();
    }
    message.state = 'done';
  } catch (e) {
    if (controller.signal.aborted) {
      message.state = 'stopped';
    } else {
      message.state = 'error';
      message.error = e.message;
      if (e instanceof ApiError && e.status === 401) notice('The server needs an API key: enter it in Settings (⚙).');
    }
  }
  const end = performance.now();
  if (thinkingStart !== null && message.thinkingMs === undefined) message.thinkingMs = end - thinkingStart;
  const tokens = usage?.completion_tokens ?? pieces;
  message.stats = {
    tokens, approx: !usage, ttftMs: first === null ? undefined : first - started,
    tokensPerSecond: first !== null && tokens > 1 && end > first ? (tokens - 1) / ((end - first) / 1000) : undefined,
    cached: usage?.prompt_tokens_details?.cached_tokens, promptTokens: usage?.prompt_tokens,
  };
  busy = null;
  setBusy(false);
  updateAssistant(el, message);
  follow();
  await persist();
}

function follow() {
  const list = $('#messages');
  if (list.scrollHeight - list.scrollTop - list.clientHeight < 200) list.scrollTop = list.scrollHeight;
}

function setBusy(on) {
  $('#send').hidden = on;
  $('#stop').hidden = !on;
  document.body.dataset.busy = on ? 'yes' : 'no';
}

/** Stop the reply that streams: the connection closes and the server frees the request. */
function stop() {
  if (busy) busy.controller.abort();
}

// -- composer and shortcuts ----------------------------------------------------------------------------------
function submit() {
  const input = $('#input');
  const text = input.value;
  if (!text.trim() || busy) return;
  input.value = '';
  autosize();
  send(text, attachments.take());
}

function autosize() {
  const input = $('#input');
  input.style.height = 'auto';
  input.style.height = `${Math.min(input.scrollHeight, 240)}px`;
}

function bindComposer() {
  const input = $('#input');
  input.addEventListener('input', autosize);
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  });
  input.addEventListener('paste', (e) => {
    const files = [...e.clipboardData.files];
    if (files.some((f) => f.type.startsWith('image/'))) {
      e.preventDefault();
      attachments.add(files);
    }
  });
  $('#send').addEventListener('click', submit);
  $('#stop').addEventListener('click', stop);
  $('#attach').addEventListener('click', () => (config?.vision ? $('#file').click() : attachments.add(
    [new File([], 'image', { type: 'image/png' })])));
  $('#file').addEventListener('change', (e) => { attachments.add(e.target.files); e.target.value = ''; });
  const main = $('#main');
  main.addEventListener('dragover', (e) => { e.preventDefault(); main.classList.add('dropping'); });
  main.addEventListener('dragleave', () => main.classList.remove('dropping'));
  main.addEventListener('drop', (e) => {
    e.preventDefault();
    main.classList.remove('dropping');
    attachments.add(e.dataTransfer.files);
  });
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && busy) {
      e.preventDefault();
      stop();
    }
    if (e.key.toLowerCase() === 'o' && e.shiftKey && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      app.open(null);
    }
  });
  $('#messages').addEventListener('click', onCodeCopy);
}

function bindHeader() {
  $('#theme-toggle').addEventListener('click', () => applyTheme(
    document.documentElement.dataset.theme === 'dark' ? 'light' : 'dark'));
  $('#thinking-toggle').addEventListener('change', (e) => settings.set('thinking', e.target.checked));
  $('#new-chat').addEventListener('click', () => app.open(null));
  $('#sidebar-open').addEventListener('click', () => { $('#app').dataset.sidebar = 'open'; });
  $('#sidebar-close').addEventListener('click', () => { $('#app').dataset.sidebar = 'closed'; });
}

/** Ask the server for the model and its defaults; on 401 open the settings so the user can enter a key. */
async function connect() {
  try {
    config = await getConfig(settings.apiKey);
  } catch (e) {
    config = null;
    if (e instanceof ApiError && e.status === 401) {
      notice('This server needs an API key: enter it in Settings (⚙) and save.', 60);
      $('#settings-open').click();
    } else {
      notice(`Cannot reach the model: ${e.message}. Retrying…`, 5);
      setTimeout(connect, 3000);
    }
    return;
  }
  settings.defaults = { ...config.defaults, thinking: false };
  attachments.vision = config.vision;
  attachments.model = config.model;
  $('#model').textContent = config.model;
  const toggle = $('#thinking-toggle');
  toggle.checked = Boolean(settings.get('thinking'));
  toggle.parentElement.title = config.thinking ? 'Thinking mode: the model reasons before it answers'
    : `${config.model} has no thinking mode (it was trained with thinking off); on, its reply comes back as thinking`;
  document.body.dataset.ready = 'yes';
}

async function boot() {
  applyTheme(initialTheme());
  bindHeader();
  bindComposer();
  bindDialog(settings, connect);
  setBusy(false);
  await sidebar.refresh();
  const latest = sidebar.conversations[0];
  if (latest) app.open(latest);
  else renderConversation();
  await connect();
  $('#input').focus();
}

boot();
