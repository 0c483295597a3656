// Stage results: one grid of maps per stage, each with the filter that made it, and the value under the
// pointer read back from the PNG level (level L of a map with range [lo, hi] stands for lo + (L+0.5)/256*(hi-lo)).

import { fmt, h } from './ui.js';

const colormaps = { tables: null, inverse: null }; // name -> Uint8Array(768); name -> Map(packed RGB -> level)
const mapInfo = new WeakMap(); // img -> {stage, op, label, lo, hi, colormap}
const pixels = new WeakMap(); // img -> ImageData, decoded on first use

/** Loads the colormap tables the server colours maps with (GET /static/colormaps.json). */
export async function loadColormaps() {
  const response = await fetch('/static/colormaps.json');
  if (!response.ok) throw new Error(`colormaps: HTTP ${response.status}`);
  const hex = await response.json();
  colormaps.tables = {};
  colormaps.inverse = {};
  for (const [name, text] of Object.entries(hex)) {
    const table = Uint8Array.from(text.match(/../g), (byte) => parseInt(byte, 16));
    const inverse = new Map();
    for (let level = 255; level >= 0; level -= 1) {
      inverse.set((table[3 * level] << 16) | (table[3 * level + 1] << 8) | table[3 * level + 2], level);
    }
    colormaps.tables[name] = table;
    colormaps.inverse[name] = inverse;
  }
}

/** The level a pixel's colour stands for under `colormap` (the nearest colour if it is not in the table). */
function levelOf(r, g, b, colormap) {
  if (colormap === 'gray' || !colormaps.inverse?.[colormap]) return r;
  const exact = colormaps.inverse[colormap].get((r << 16) | (g << 8) | b);
  if (exact !== undefined) return exact;
  const table = colormaps.tables[colormap];
  let best = 0;
  let bestDistance = Infinity;
  for (let level = 0; level < 256; level += 1) {
    const d = (table[3 * level] - r) ** 2 + (table[3 * level + 1] - g) ** 2 + (table[3 * level + 2] - b) ** 2;
    if (d < bestDistance) [best, bestDistance] = [level, d];
  }
  return best;
}

/** A kernel as a small grid of cells, blue for negative and red for positive; numbers when they are short. */
export function kernelView(kernel, name) {
  const rows = Array.isArray(kernel[0]?.[0]) ? kernel[0] : kernel; // a C x kH x kW kernel shows its first slice
  const flat = rows.flat();
  const scale = Math.max(...flat.map(Math.abs)) || 1;
  const numbers = rows.length <= 5 && rows[0].length <= 5 && flat.every((v) => Number.isInteger(v) && Math.abs(v) < 100);
  const grid = h('span', {
    class: numbers ? 'kernel numbers' : 'kernel',
    role: 'img',
    'aria-label': `kernel ${name}: ${rows.map((r) => r.map(fmt).join(' ')).join('; ')}`,
    title: `${name}\n${rows.map((r) => r.map(fmt).join('  ')).join('\n')}`,
  });
  grid.style.gridTemplateColumns = `repeat(${rows[0].length}, 1fr)`;
  for (const v of flat) {
    const cell = h('span', {}, numbers ? String(v) : '');
    const t = Math.abs(v) / scale;
    const [r, g, b] = v < 0 ? [59, 76, 192] : [180, 4, 38];
    cell.style.backgroundColor = `rgba(${r}, ${g}, ${b}, ${(0.12 + 0.88 * t).toFixed(3)})`;
    if (t > 0.55) cell.classList.add('strong');
    grid.append(cell);
  }
  return grid;
}

/** The filter that made a map: its label's outermost name, in the nearest conv stage at or before it. */
function filterFor(filterSets, stageIndex, label) {
  const name = label.split('(')[0];
  const set = filterSets.filter((s) => s.stage <= stageIndex).at(-1);
  return set?.filters.find((f) => f.name === name) ?? null;
}

/** Renders a featuremaps response (PNG format) into `container`: one section per stage. */
export function renderStages(container, body, colormap) {
  const filterSets = [...(body.filters ?? [])].sort((a, b) => a.stage - b.stage);
  container.replaceChildren(
    ...body.stages.map((stage) => {
      const [channels, height, width] = stage.shape;
      const small = Math.max(width, height) < 100;
      const grid = h('div', { class: ['maps', small && 'compact', channels > (small ? 16 : 32) && 'many'].filter(Boolean).join(' ') });
      stage.maps.forEach((png, c) => {
        const label = stage.channels[c];
        const filter = filterFor(filterSets, stage.index, label);
        const img = h('img', {
          src: `data:image/png;base64,${png}`,
          alt: `Stage ${stage.index} (${stage.op}), map ${label}`,
          width,
          height,
          class: Math.max(width, height) < 160 ? 'pixelated' : null,
        });
        const [lo, hi] = stage.map_ranges[c];
        mapInfo.set(img, { stage: stage.index, op: stage.op, label, lo, hi, colormap });
        grid.append(h('figure', { class: 'map' }, img, h('figcaption', {}, h('span', { class: 'channel' }, label),
          filter ? kernelView(filter.kernel, filter.name) : null)));
      });
      return h('section', { class: 'stage', 'data-stage': stage.index, 'data-op': stage.op, 'data-shape': stage.shape.join(',') },
        h('h3', {},
          h('span', { class: 'stage-name' }, `Stage ${stage.index}: ${stage.op}`),
          h('span', { class: 'shape', title: 'channels × height × width' }, `${channels} × ${height} × ${width}`),
          h('span', { class: 'range' }, `min ${fmt(stage.min)}, max ${fmt(stage.max)}`)),
        grid);
    }),
  );
}

function imageData(img) {
  let data = pixels.get(img);
  if (!data) {
    const canvas = new OffscreenCanvas(img.naturalWidth, img.naturalHeight);
    const ctx = canvas.getContext('2d', { willReadFrequently: true });
    ctx.drawImage(img, 0, 0);
    data = ctx.getImageData(0, 0, img.naturalWidth, img.naturalHeight);
    pixels.set(img, data);
  }
  return data;
}

/** Shows, in `output`, the value under the pointer for any map rendered into `container` (the last one stays). */
export function attachReadout(container, output) {
  container.addEventListener('pointermove', (event) => {
    const img = event.target;
    const info = img instanceof HTMLImageElement ? mapInfo.get(img) : undefined;
    if (!info || !img.complete || !img.naturalWidth) return;
    const x = Math.min(img.naturalWidth - 1, Math.max(0, Math.floor((event.offsetX / img.clientWidth) * img.naturalWidth)));
    const y = Math.min(img.naturalHeight - 1, Math.max(0, Math.floor((event.offsetY / img.clientHeight) * img.naturalHeight)));
    const data = imageData(img);
    const i = 4 * (y * img.naturalWidth + x);
    const level = levelOf(data.data[i], data.data[i + 1], data.data[i + 2], info.colormap);
    const step = (info.hi - info.lo) / 256;
    const value = info.hi > info.lo ? info.lo + (level + 0.5) * step : info.lo;
    Object.assign(output.dataset, { stage: info.stage, label: info.label, x, y, level, value, step });
    output.textContent = `Stage ${info.stage} (${info.op}), ${info.label}, x ${x}, y ${y}: level ${level}, value ≈ ${fmt(value)}`
      + (step > 0 ? ` (± ${fmt(step / 2)})` : '');
  });
}
