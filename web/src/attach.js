/** Image attachments: picker, drag and drop, paste. Large images are scaled down in the browser so a photo fits
 * the server's body limit; without a vision tower every image is refused with a note. */

import { h, notice } from './dom.js';

const MAX_SIDE = 1536;
const MAX_BYTES = 1_000_000;
const TYPES = ['image/png', 'image/jpeg', 'image/webp', 'image/gif'];

const readAsDataUrl = (blob) => new Promise((resolve, reject) => {
  const reader = new FileReader();
  reader.onload = () => resolve(reader.result);
  reader.onerror = () => reject(reader.error);
  reader.readAsDataURL(blob);
});

async function shrink(file) {
  if (file.size <= MAX_BYTES) return readAsDataUrl(file);
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
  const canvas = h('canvas', { width: Math.round(bitmap.width * scale), height: Math.round(bitmap.height * scale) });
  canvas.getContext('2d').drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL('image/jpeg', 0.9);
}

export class Attachments {
  constructor(container) {
    this.container = container;
    this.images = [];
    this.vision = false;
    this.model = 'this model';
  }

  /** Add image files (from the picker, a drop or a paste). */
  async add(files) {
    const images = [...files].filter((f) => f.type.startsWith('image/'));
    if (!images.length) return;
    if (!this.vision) {
      notice(`${this.model} has no vision tower, so it cannot read images; serve a Qwen3.5 checkpoint with one `
        + '(e.g. qwen35 serve -m Qwen/Qwen3.5-0.8B) to attach them.');
      return;
    }
    for (const file of images) {
      if (!TYPES.includes(file.type)) {
        notice(`${file.name}: only PNG, JPEG, WebP and GIF images are accepted`);
        continue;
      }
      this.images.push(await shrink(file));
    }
    this.render();
  }

  /** The attached images (data URLs), cleared from the composer. */
  take() {
    const out = this.images;
    this.images = [];
    this.render();
    return out;
  }

  render() {
    this.container.replaceChildren(...this.images.map((src, i) => h('span', { className: 'attachment' },
      h('img', { src, alt: `attachment ${i + 1}` }),
      h('button', { type: 'button', className: 'icon', textContent: '✕', ariaLabel: 'Remove image',
        onclick: () => { this.images.splice(i, 1); this.render(); } }))));
  }
}
