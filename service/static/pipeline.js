// The pipeline editor: stages (conv, activations, pool) as a list of small forms, and conv filters as chips
// that open a kernel grid. The state is plain objects; `toSpec` turns it into the API's `layers`.

import { h } from './ui.js';
import { kernelView } from './maps.js';

const OPS = ['conv', 'relu', 'leaky_relu', 'sigmoid', 'tanh', 'abs', 'pool'];
const SEEDS = ['seed_1', 'seed_2', 'seed_3', 'seed_4'];
const MAX_KERNEL_SIDE = 9;

/** The tutorial's pipeline, the service's default: the four seed filters, ReLU, 2x2 max pooling. */
export function tutorialLayers() {
  const conv = { ...newLayer('conv'), filters: SEEDS.map((name) => ({ name })), padding: 'valid', padding_mode: 'zeros' };
  return [conv, newLayer('relu'), newLayer('pool')];
}

function newLayer(op) {
  switch (op) {
    case 'conv':
      return { op, filters: [{ name: 'sobel_x' }, { name: 'sobel_y' }], padding: 'same', pixels: '1', padding_mode: 'reflect', stride: '1' };
    case 'pool':
      return { op, mode: 'max', size: '2', stride: '' };
    case 'leaky_relu':
      return { op, negative_slope: '0.01' };
    default:
      return { op };
  }
}

/** A number field's text as a number; empty means "leave it to the server's default". */
function numberOf(text) {
  const trimmed = String(text ?? '').trim();
  return trimmed === '' ? undefined : Number(trimmed);
}

/** The API's `layers` for the editor's stages. */
export function toSpec(layers) {
  return layers.map((layer) => {
    switch (layer.op) {
      case 'conv':
        return {
          op: 'conv',
          filters: layer.filters.map((f) => (f.kernel ? { name: f.name, kernel: f.kernel } : f.name)),
          padding: layer.padding === 'pixels' ? numberOf(layer.pixels) : layer.padding,
          padding_mode: layer.padding_mode,
          stride: numberOf(layer.stride),
        };
      case 'pool':
        return { op: 'pool', mode: layer.mode, size: numberOf(layer.size), stride: numberOf(layer.stride) };
      case 'leaky_relu':
        return { op: 'leaky_relu', negative_slope: numberOf(layer.negative_slope) };
      default:
        return { op: layer.op };
    }
  });
}

function select(attrs, options, selected) {
  return h('select', attrs, options.map(([value, text]) => h('option', { value, selected: value === selected }, text)));
}

function field(label, control) {
  return h('label', {}, label, control);
}

/** The editor, bound to the <ol> `list`. `catalogue()` gives the loaded presets and banks (or null). */
export class PipelineEditor {
  constructor(list, catalogue) {
    this.list = list;
    this.catalogue = catalogue;
    this.layers = tutorialLayers();
    this.editing = null; // {stage, filter (index or null for a new one), name, values: string[][]}
    list.addEventListener('input', (e) => this.onInput(e));
    list.addEventListener('change', (e) => this.onChange(e));
    list.addEventListener('click', (e) => this.onClick(e));
    this.render();
  }

  reset() {
    this.layers = tutorialLayers();
    this.editing = null;
    this.render();
  }

  add(op) {
    this.layers.push(newLayer(op));
    this.render();
    this.list.lastElementChild?.querySelector('select')?.focus();
  }

  presetKernel(name) {
    return this.catalogue()?.filters.find((f) => f.name === name)?.kernel ?? null;
  }

  // Plain values update the state in place (no re-render, so typing keeps its focus).
  onInput(event) {
    const { target } = event;
    const li = target.closest('li[data-index]');
    const name = target.dataset.field;
    if (!li || !name || name === 'rows' || name === 'cols') return;
    if (name === 'k') {
      this.editing.values[target.dataset.r][target.dataset.c] = target.value;
    } else if (name === 'kname') {
      this.editing.name = target.value;
    } else if (target.tagName === 'INPUT') {
      this.layers[li.dataset.index][name] = target.value;
    }
  }

  onChange(event) {
    const { target } = event;
    const li = target.closest('li[data-index]');
    const name = target.dataset.field;
    if (!li || !name || target.tagName !== 'SELECT') {
      if (name === 'rows' || name === 'cols') this.resizeKernel(name, target.value);
      return;
    }
    const layer = this.layers[li.dataset.index];
    if (name === 'op') {
      this.layers[li.dataset.index] = newLayer(target.value);
      if (this.editing?.stage === Number(li.dataset.index)) this.editing = null;
    } else if (name === 'add-filter') {
      const bank = this.catalogue()?.banks.find((b) => b.name === target.value);
      for (const preset of bank ? bank.filters : [target.value]) layer.filters.push({ name: preset });
    } else if (name === 'load-kernel') {
      this.loadKernel(target.value);
    } else {
      layer[name] = target.value;
    }
    this.render();
  }

  onClick(event) {
    const button = event.target.closest('button[data-action]');
    const li = button?.closest('li[data-index]');
    if (!li) return;
    const i = Number(li.dataset.index);
    const layer = this.layers[i];
    const j = Number(button.dataset.filter);
    switch (button.dataset.action) {
      case 'up':
      case 'down': {
        const k = button.dataset.action === 'up' ? i - 1 : i + 1;
        if (k < 0 || k >= this.layers.length) return;
        [this.layers[i], this.layers[k]] = [this.layers[k], this.layers[i]];
        this.editing = null;
        break;
      }
      case 'remove':
        this.layers.splice(i, 1);
        this.editing = null;
        break;
      case 'remove-filter':
        layer.filters.splice(j, 1);
        this.editing = null;
        break;
      case 'edit-filter': {
        const f = layer.filters[j];
        const kernel = f.kernel ?? this.presetKernel(f.name) ?? [[0, 0, 0], [0, 1, 0], [0, 0, 0]];
        this.editing = { stage: i, filter: j, name: f.name, values: kernel.map((r) => r.map(String)) };
        break;
      }
      case 'new-filter': {
        const n = layer.filters.filter((f) => f.kernel).length + 1;
        this.editing = { stage: i, filter: null, name: `custom_${n}`, values: [['0', '0', '0'], ['0', '1', '0'], ['0', '0', '0']] };
        break;
      }
      case 'seed':
        this.loadKernel(button.dataset.seed);
        break;
      case 'save-kernel':
        this.saveKernel(layer);
        break;
      case 'cancel-kernel':
        this.editing = null;
        break;
      default:
        return;
    }
    this.render();
  }

  loadKernel(name) {
    const kernel = this.presetKernel(name);
    if (!kernel || !this.editing) return;
    this.editing.values = kernel.map((r) => r.map(String));
    this.editing.name = name;
  }

  resizeKernel(which, text) {
    const size = Math.min(MAX_KERNEL_SIDE, Math.max(1, Math.round(Number(text)) || 1));
    const { values } = this.editing;
    const rows = which === 'rows' ? size : values.length;
    const cols = which === 'cols' ? size : values[0].length;
    this.editing.values = Array.from({ length: rows }, (_, r) => Array.from({ length: cols }, (_, c) => values[r]?.[c] ?? '0'));
    this.render();
  }

  saveKernel(layer) {
    const { filter, values } = this.editing;
    const kernel = values.map((r) => r.map((v) => (String(v).trim() === '' ? 0 : Number(v))));
    const name = this.editing.name.trim() || 'custom';
    const preset = this.presetKernel(name);
    const same = preset && JSON.stringify(preset) === JSON.stringify(kernel);
    const entry = same ? { name } : { name: preset ? `${name}_edited` : name, kernel };
    if (filter === null) layer.filters.push(entry);
    else layer.filters[filter] = entry;
    this.editing = null;
  }

  render() {
    const focused = document.activeElement?.id;
    this.list.replaceChildren(...this.layers.map((layer, i) => this.stageItem(layer, i)));
    if (focused) document.getElementById(focused)?.focus();
  }

  stageItem(layer, i) {
    const id = (name) => `stage-${i}-${name}`;
    const head = h('div', { class: 'stage-head' },
      h('span', { class: 'stage-index', 'aria-hidden': 'true' }, i),
      select({ id: id('op'), 'data-field': 'op', 'aria-label': `Stage ${i} operation` }, OPS.map((op) => [op, op]), layer.op),
      h('span', { class: 'spacer' }),
      h('button', { type: 'button', class: 'icon', 'data-action': 'up', 'aria-label': `Move stage ${i} up`, disabled: i === 0 }, '↑'),
      h('button', { type: 'button', class: 'icon', 'data-action': 'down', 'aria-label': `Move stage ${i} down`, disabled: i === this.layers.length - 1 }, '↓'),
      h('button', { type: 'button', class: 'icon', 'data-action': 'remove', 'aria-label': `Remove stage ${i}` }, '×'));
    const body = [];
    if (layer.op === 'conv') body.push(...this.convBody(layer, i, id));
    if (layer.op === 'pool') {
      body.push(h('div', { class: 'row' },
        field('Mode', select({ id: id('mode'), 'data-field': 'mode' }, [['max', 'max'], ['avg', 'average']], layer.mode)),
        field('Size', h('input', { id: id('size'), name: 'size', type: 'number', min: 1, step: 1, 'data-field': 'size', value: layer.size })),
        field('Stride', h('input', { id: id('stride'), name: 'stride', type: 'number', min: 1, step: 1, placeholder: 'size', 'data-field': 'stride', value: layer.stride }))));
    }
    if (layer.op === 'leaky_relu') {
      body.push(h('div', { class: 'row' },
        field('Negative slope', h('input', { id: id('slope'), type: 'number', step: 'any', 'data-field': 'negative_slope', value: layer.negative_slope }))));
    }
    return h('li', { class: 'stage-editor', 'data-index': i, 'data-op': layer.op }, head, ...body);
  }

  convBody(layer, i, id) {
    const catalogue = this.catalogue();
    const chips = h('div', { class: 'chips', 'data-field': 'filters', role: 'list', 'aria-label': `Stage ${i} filters` },
      layer.filters.map((f, j) => {
        const kernel = f.kernel ?? this.presetKernel(f.name);
        return h('span', { class: f.kernel ? 'chip custom' : 'chip', role: 'listitem' },
          h('button', { type: 'button', class: 'chip-edit', 'data-action': 'edit-filter', 'data-filter': j, 'aria-label': `Edit filter ${f.name}` },
            kernel ? kernelView(kernel, f.name) : null, f.name),
          h('button', { type: 'button', class: 'icon', 'data-action': 'remove-filter', 'data-filter': j, 'aria-label': `Remove filter ${f.name}` }, '×'));
      }));
    const add = select({ id: id('add'), 'data-field': 'add-filter', 'aria-label': `Add a preset filter or bank to stage ${i}` }, [['', 'Add a preset…']], '');
    if (catalogue) {
      add.append(h('optgroup', { label: 'Banks' }, catalogue.banks.map((b) => h('option', { value: b.name, title: b.description }, `${b.name} (${b.filters.join(', ')})`))));
      add.append(h('optgroup', { label: 'Filters' }, catalogue.filters.map((f) => h('option', { value: f.name, title: f.description }, f.name))));
    }
    const padding = h('div', { class: 'row' },
      field('Padding', select({ id: id('padding'), 'data-field': 'padding' }, [['valid', 'valid (none)'], ['same', 'same'], ['pixels', 'pixels…']], layer.padding)),
      layer.padding === 'pixels'
        ? field('Pixels', h('input', { id: id('pixels'), type: 'number', min: 0, step: 1, 'data-field': 'pixels', value: layer.pixels }))
        : null,
      layer.padding === 'valid' ? null
        : field('Border', select({ id: id('padding-mode'), 'data-field': 'padding_mode' }, ['zeros', 'reflect', 'replicate', 'circular'].map((m) => [m, m]), layer.padding_mode)),
      field('Stride', h('input', { id: id('stride'), name: 'stride', type: 'number', min: 1, step: 1, 'data-field': 'stride', value: layer.stride })));
    const parts = [chips,
      h('div', { class: 'row' }, add, h('button', { type: 'button', 'data-action': 'new-filter' }, 'Custom kernel…')),
      padding];
    if (this.editing?.stage === i) parts.push(this.kernelEditor(i, id, catalogue));
    return parts;
  }

  kernelEditor(i, id, catalogue) {
    const { values, name } = this.editing;
    const grid = h('div', { class: 'kgrid', role: 'group', 'aria-label': 'Kernel values' });
    grid.style.gridTemplateColumns = `repeat(${values[0].length}, 3.6em)`;
    values.forEach((row, r) => row.forEach((v, c) => grid.append(h('input', {
      id: id(`k-${r}-${c}`), type: 'number', step: 'any', value: v, 'data-field': 'k', 'data-r': r, 'data-c': c,
      'aria-label': `row ${r + 1}, column ${c + 1}`,
    }))));
    const load = select({ id: id('load'), 'data-field': 'load-kernel', 'aria-label': 'Load a preset kernel' }, [['', 'Load a preset…']], '');
    for (const f of catalogue?.filters ?? []) load.append(h('option', { value: f.name }, f.name));
    return h('div', { class: 'kernel-editor', role: 'group', 'aria-label': `Kernel editor, stage ${i}` },
      h('div', { class: 'row' },
        field('Name', h('input', { id: id('kname'), type: 'text', maxlength: 64, 'data-field': 'kname', value: name })),
        field('Rows', h('input', { id: id('rows'), type: 'number', min: 1, max: MAX_KERNEL_SIDE, 'data-field': 'rows', value: values.length })),
        field('Columns', h('input', { id: id('cols'), type: 'number', min: 1, max: MAX_KERNEL_SIDE, 'data-field': 'cols', value: values[0].length }))),
      grid,
      h('div', { class: 'row' }, load,
        h('span', { class: 'hint' }, 'The tutorial’s four:'),
        SEEDS.map((s) => h('button', { type: 'button', class: 'small', 'data-action': 'seed', 'data-seed': s }, s))),
      h('div', { class: 'row' },
        h('button', { type: 'button', class: 'primary small', 'data-action': 'save-kernel' }, 'Use this kernel'),
        h('button', { type: 'button', class: 'small', 'data-action': 'cancel-kernel' }, 'Cancel')));
  }
}
