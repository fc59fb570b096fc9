/** The conversation list: open, rename, delete, search, export and import. */

import { $, h, notice } from './dom.js';
import * as store from './store.js';

export class Sidebar {
  /** `app` gives currentId() and open(conversation | null); `conversations` is the stored list. */
  constructor(app) {
    this.app = app;
    this.conversations = [];
    this.list = $('#conversations');
    $('#search').addEventListener('input', () => this.render());
    $('#export').addEventListener('click', () => this.exportAll());
    $('#import').addEventListener('change', (e) => this.importFile(e.target));
  }

  async refresh() {
    this.conversations = await store.list();
    this.render();
  }

  render() {
    const query = $('#search').value;
    const shown = this.conversations.filter((c) => store.matches(c, query));
    this.list.replaceChildren(...shown.map((c) => this.item(c)));
  }

  item(conversation) {
    const title = h('button', { type: 'button', className: 'conv-title', textContent: conversation.title,
      title: conversation.title, onclick: () => this.app.open(conversation) });
    return h('li', { className: conversation.id === this.app.currentId() ? 'current' : '', dataset: { id: conversation.id } },
      title,
      h('button', { type: 'button', className: 'icon rename', textContent: '✎', ariaLabel: 'Rename',
        onclick: () => this.rename(conversation, title) }),
      h('button', { type: 'button', className: 'icon delete', textContent: '✕', ariaLabel: 'Delete',
        onclick: () => this.remove(conversation) }));
  }

  rename(conversation, title) {
    const input = h('input', { className: 'rename-input', value: conversation.title, ariaLabel: 'New title' });
    const finish = async (keep) => {
      if (keep && input.value.trim()) {
        conversation.title = input.value.trim().slice(0, 200);
        await store.save(conversation);
        this.app.renamed(conversation);
      }
      await this.refresh();
    };
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter') finish(true);
      if (e.key === 'Escape') { e.stopPropagation(); finish(false); }
    });
    input.addEventListener('blur', () => finish(true), { once: true });
    title.replaceWith(input);
    input.focus();
    input.select();
  }

  async remove(conversation) {
    if (!confirm(`Delete "${conversation.title}"?`)) return;
    await store.remove(conversation.id);
    if (conversation.id === this.app.currentId()) this.app.open(null);
    await this.refresh();
  }

  exportAll() {
    const blob = new Blob([store.exportJson(this.conversations)], { type: 'application/json' });
    const url = URL.createObjectURL(blob);
    const link = h('a', { href: url, download: `qwen35-chats-${new Date().toISOString().slice(0, 10)}.json` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  async importFile(input) {
    const file = input.files[0];
    input.value = '';
    if (!file) return;
    try {
      const added = store.parseImport(await file.text(), new Set(this.conversations.map((c) => c.id)));
      for (const conversation of added) await store.save(conversation);
      notice(`Imported ${added.length} conversation${added.length === 1 ? '' : 's'}.`);
    } catch (e) {
      notice(`Import failed: ${e.message}`);
    }
    await this.refresh();
  }
}
