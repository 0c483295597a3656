// The digit pad: draw on a canvas (or drop a picture), then the MLP's and the CNN's probabilities side by side,
// the 28x28 image each model saw, and the CNN's own feature maps layer by layer.

import { ProblemError, callApi, formWith } from './api.js';
import { attachReadout, renderStages } from './maps.js';
import { clearProblem, h, showProblem } from './ui.js';

const MODELS = ['mlp', 'cnn'];
const INK = '#111';
const PAPER = '#fff';

export function initDigits() {
  const canvas = document.getElementById('digit-canvas');
  const ctx = canvas.getContext('2d');
  const results = document.getElementById('digit-results');
  const problem = document.getElementById('digit-problem');
  const status = document.getElementById('digit-status');
  const maps = document.getElementById('cnn-maps');
  const colormap = document.getElementById('digit-colormap');
  let picture = null; // a dropped or opened file, sent as it is until someone draws over it
  let last = null; // the previous point of the stroke being drawn
  let inked = false;
  let controller = null;

  for (const model of MODELS) {
    document.getElementById(`${model}-bars`).replaceChildren(...Array.from({ length: 10 }, (_, d) => {
      const fill = h('span', { class: 'fill' });
      return h('li', { 'data-digit': d }, h('span', { class: 'digit' }, d), h('span', { class: 'bar' }, fill), h('span', { class: 'p' }, ''));
    }));
  }
  attachReadout(maps, document.getElementById('digit-readout'));

  function clear() {
    ctx.fillStyle = PAPER;
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    picture = null;
    inked = false;
  }

  function point(event) {
    const rect = canvas.getBoundingClientRect();
    return [(event.clientX - rect.left) * (canvas.width / rect.width), (event.clientY - rect.top) * (canvas.height / rect.height)];
  }

  function stroke(from, to) {
    ctx.strokeStyle = INK;
    ctx.lineWidth = canvas.width / 14;
    ctx.lineCap = 'round';
    ctx.lineJoin = 'round';
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
  }

  canvas.addEventListener('pointerdown', (event) => {
    if (event.button !== 0) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    if (picture) clear(); // drawing starts a new digit rather than scribbling over a photo
    last = point(event);
    stroke(last, last);
    inked = true;
  });
  canvas.addEventListener('pointermove', (event) => {
    if (!last) return;
    for (const e of event.getCoalescedEvents?.() ?? [event]) {
      const p = point(e);
      stroke(last, p);
      last = p;
    }
  });
  const lift = () => {
    if (!last) return;
    last = null;
    classify();
  };
  canvas.addEventListener('pointerup', lift);
  canvas.addEventListener('pointercancel', lift);

  async function usePicture(file) {
    if (!file) return;
    clear();
    picture = file;
    inked = true;
    try {
      const bitmap = await createImageBitmap(file);
      const scale = Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
      const [w, hgt] = [bitmap.width * scale, bitmap.height * scale];
      ctx.drawImage(bitmap, (canvas.width - w) / 2, (canvas.height - hgt) / 2, w, hgt);
    } catch {
      // the browser cannot show it; the service will say whether it can read it
    }
    classify();
  }

  canvas.addEventListener('dragover', (event) => event.preventDefault());
  canvas.addEventListener('drop', (event) => {
    event.preventDefault();
    usePicture(event.dataTransfer.files[0]);
  });
  document.getElementById('digit-file').addEventListener('change', (event) => {
    usePicture(event.target.files[0]);
    event.target.value = '';
  });
  document.getElementById('digit-clear').addEventListener('click', () => {
    clear();
    controller?.abort();
    clearProblem(problem);
    status.textContent = '';
  });
  document.getElementById('digit-predict').addEventListener('click', () => classify());
  colormap.addEventListener('change', () => inked && classify());

  function showPrediction(model, p) {
    document.getElementById(`${model}-label`).textContent = p.label;
    document.getElementById(`${model}-confidence`).textContent = ` ${(100 * p.confidence).toFixed(1)}% sure`;
    document.getElementById(`${model}-input`).src = `data:image/png;base64,${p.input_image}`;
    for (const li of document.getElementById(`${model}-bars`).children) {
      const d = Number(li.dataset.digit);
      const probability = p.probabilities[d];
      li.classList.toggle('top', d === p.label);
      li.querySelector('.fill').style.width = `${(100 * probability).toFixed(2)}%`;
      li.querySelector('.p').textContent = `${(100 * probability).toFixed(1)}%`;
      li.setAttribute('aria-label', `${d}: ${(100 * probability).toFixed(1)}%`);
    }
  }

  function resetPredictions() {
    for (const model of MODELS) {
      document.getElementById(`${model}-label`).textContent = '–';
      document.getElementById(`${model}-confidence`).textContent = '';
      document.getElementById(`${model}-input`).removeAttribute('src');
      for (const li of document.getElementById(`${model}-bars`).children) {
        li.classList.remove('top');
        li.querySelector('.fill').style.width = '0';
        li.querySelector('.p').textContent = '';
      }
    }
    maps.replaceChildren();
  }

  async function classify() {
    controller?.abort();
    controller = new AbortController();
    const { signal } = controller;
    const image = picture ?? await new Promise((resolve) => canvas.toBlob(resolve, 'image/png'));
    const filename = picture?.name || 'digit.png';
    const cm = colormap.value;
    results.dataset.state = 'running';
    status.textContent = 'Classifying…';
    try {
      const [mlp, cnn, layers] = await Promise.all([
        ...MODELS.map((model) => callApi('/v1/predict', { method: 'POST', signal, body: formWith(image, filename, { model, top_k: 3, include_input: true }) })),
        callApi('/v1/models/cnn/featuremaps', { method: 'POST', signal, body: formWith(image, filename, { spec: { output: { colormap: cm } } }) }),
      ]);
      clearProblem(problem);
      showPrediction('mlp', mlp);
      showPrediction('cnn', cnn);
      renderStages(maps, layers, cm);
      status.textContent = mlp.label === cnn.label ? `Both models read a ${cnn.label}.` : `The MLP reads a ${mlp.label}, the CNN a ${cnn.label}.`;
      results.dataset.state = 'done';
    } catch (err) {
      if (signal.aborted) return;
      resetPredictions();
      status.textContent = '';
      showProblem(problem, err instanceof ProblemError ? err.problem : { title: 'Error in the page', detail: String(err) });
      results.dataset.state = 'error';
    }
    results.dataset.run = Number(results.dataset.run) + 1;
  }

  clear();
}
