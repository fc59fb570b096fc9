/** Model output -> safe HTML: Markdown (marked, GFM tables), code highlighting (highlight.js), math (KaTeX),
 * sanitised by DOMPurify before it touches the page. Model output is untrusted: scripts, event handlers,
 * javascript: links, forms and remote images never survive, and the page's CSP blocks what might. */

import { Marked } from 'marked';
import hljs from 'highlight.js/lib/common';
import DOMPurify from 'dompurify';
import katex from 'katex';

const ESCAPES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ESCAPES[c]);

// Math is tokenised here and left as escaped TeX in placeholders; KaTeX renders them after sanitising.
const mathBlock = {
  name: 'mathBlock',
  level: 'block',
  start: (src) => src.match(/^ {0,3}(\$\$|\\\[)/m)?.index,
  tokenizer(src) {
    const m = /^ {0,3}(?:\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\])[ \t]*(?:\n|$)/.exec(src);
    if (m) return { type: 'mathBlock', raw: m[0], text: (m[1] ?? m[2]).trim() };
    return undefined;
  },
  renderer: (token) => `<div class="math math-display">${escapeHtml(token.text)}</div>\n`,
};

const mathInline = {
  name: 'mathInline',
  level: 'inline',
  start: (src) => src.match(/\$|\\\(/)?.index,
  tokenizer(src) {
    const m = /^(?:\$\$([^$]+?)\$\$|\$(?![\s$])([^$\n]+?)(?<!\s)\$(?!\d)|\\\(([\s\S]+?)\\\))/.exec(src);
    if (m) return { type: 'mathInline', raw: m[0], text: (m[1] ?? m[2] ?? m[3]).trim(), display: m[1] !== undefined };
    return undefined;
  },
  renderer: (token) => `<span class="math${token.display ? ' math-display' : ''}">${escapeHtml(token.text)}</span>`,
};

function highlight(text, lang) {
  if (lang && hljs.getLanguage(lang)) return hljs.highlight(text, { language: lang, ignoreIllegals: true }).value;
  if (text.length < 4000) return hljs.highlightAuto(text).value;
  return escapeHtml(text);
}

const marked = new Marked({ gfm: true, breaks: false });
marked.use({
  extensions: [mathBlock, mathInline],
  renderer: {
    code({ text, lang }) {
      const language = (lang || '').match(/^[\w+#.-]*/)[0].toLowerCase();
      return `<pre><code class="hljs" data-lang="${escapeHtml(language)}">${highlight(text, language)}</code></pre>\n`;
    },
  },
});

// Anything interactive or loading from elsewhere is dropped; links may only go to http(s)/mailto, in a new tab.
const FORBID_TAGS = ['form', 'input', 'button', 'textarea', 'select', 'option', 'style', 'dialog', 'iframe', 'object',
  'embed', 'link', 'meta', 'base', 'video', 'audio', 'source', 'picture', 'template', 'math', 'svg'];
const FORBID_ATTR = ['style', 'action', 'formaction', 'srcset', 'target', 'ping'];

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A') {
    const href = node.getAttribute('href') || '';
    if (/^(https?:|mailto:)/i.test(href)) {
      node.setAttribute('target', '_blank');
      node.setAttribute('rel', 'noopener noreferrer');
    } else {
      node.removeAttribute('href');
    }
  }
  if (node.tagName === 'IMG' && !/^data:image\/(png|jpeg|gif|webp);/i.test(node.getAttribute('src') || '')) {
    node.removeAttribute('src');  // no request to anywhere for a model's <img>
  }
});

/** Sanitised HTML for untrusted Markdown. */
export function markdownToHtml(text) {
  const html = marked.parse(text, { async: false });
  return DOMPurify.sanitize(html, { USE_PROFILES: { html: true }, FORBID_TAGS, FORBID_ATTR });
}

function addCodeBars(root) {
  for (const pre of root.querySelectorAll('pre')) {
    const code = pre.querySelector('code');
    if (!code || pre.querySelector('.code-bar')) continue;
    const bar = document.createElement('div');
    bar.className = 'code-bar';
    const label = document.createElement('span');
    label.textContent = code.dataset.lang || 'text';
    const copy = document.createElement('button');
    copy.type = 'button';
    copy.className = 'copy-code';
    copy.textContent = 'Copy';
    bar.append(label, copy);
    pre.prepend(bar);
  }
}

function renderMath(root) {
  for (const el of root.querySelectorAll('.math')) {
    katex.render(el.textContent, el, {
      displayMode: el.classList.contains('math-display'), throwOnError: false, trust: false, strict: 'ignore',
    });
  }
}

/** Render untrusted Markdown into `root` (replacing what it held). */
export function renderMarkdown(root, text) {
  root.innerHTML = markdownToHtml(text);
  addCodeBars(root);
  renderMath(root);
}

/** Copy text to the clipboard (the page is served from loopback, a secure context). */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    return false;
  }
}

/** Click handler for the copy buttons of code blocks (delegated from the message list). */
export async function onCodeCopy(event) {
  const button = event.target.closest('.copy-code');
  if (!button) return;
  const code = button.closest('pre')?.querySelector('code');
  if (!code) return;
  button.textContent = (await copyText(code.textContent)) ? 'Copied' : 'Copy failed';
  setTimeout(() => { button.textContent = 'Copy'; }, 1500);
}
