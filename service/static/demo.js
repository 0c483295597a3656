// The demo page's entry point: the API key, the filter catalogue, the input image, and running the pipeline.

import { ProblemError, callApi, formWith, setApiKey, storedApiKey } from './api.js';
import { initDigits } from './digits.js';
import { attachReadout, loadColormaps, renderStages } from './maps.js';
import { PipelineEditor, toSpec } from './pipeline.js';
import { clearProblem, showProblem } from './ui.js';

const $ = (id) => document.getElementById(id);
const SAMPLE = '/static/samples/dog.jpg';

let catalogue = null; // GET /v1/filters: {filters, banks}
let image = null; // {blob, name}
let controller = null;

const editor = new PipelineEditor($('fm-stages'), () => catalogue);

function problemOf(err) {
  return err instanceof ProblemError ? err.problem : { title: 'Error in the page', detail: String(err) };
}

/** Marks the stage controls a problem's `errors` point at (`#/layers/2/size`), and clears earlier marks. */
function markInvalid(problem) {
  for (const el of document.querySelectorAll('#fm-stages [aria-invalid]')) el.removeAttribute('aria-invalid');
  for (const { pointer } of problem?.errors ?? []) {
    const [, stage, name] = /^#\/layers\/(\d+)\/(\w+)/.exec(pointer ?? '') ?? [];
    const control = stage && document.querySelector(`#fm-stages li[data-index="${stage}"] [data-field="${name}"]`);
    control?.setAttribute('aria-invalid', 'true');
  }
}

async function loadCatalogue() {
  try {
    catalogue = await callApi('/v1/filters');
    clearProblem($('page-problem'));
    editor.render();
  } catch (err) {
    showProblem($('page-problem'), problemOf(err));
  }
}

function useImage(blob, name) {
  image = { blob, name };
  const preview = $('fm-preview');
  if (preview.src.startsWith('blob:')) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  $('fm-image-name').textContent = name;
}

async function useSample() {
  const response = await fetch(SAMPLE);
  if (!response.ok) throw new ProblemError({ title: 'Sample missing', detail: `GET ${SAMPLE}: HTTP ${response.status}` });
  useImage(await response.blob(), 'dog.jpg (the tutorial’s sample)');
}

async function run() {
  controller?.abort();
  controller = new AbortController();
  const { signal } = controller;
  const results = $('fm-results');
  const colormap = $('fm-colormap').value;
  const spec = {
    color: $('fm-color').value,
    normalize: $('fm-normalize').value,
    layers: toSpec(editor.layers),
    output: { format: 'png', colormap, scale: $('fm-scale').value },
  };
  results.dataset.state = 'running';
  results.setAttribute('aria-busy', 'true');
  $('fm-status').textContent = 'Running…';
  $('fm-run').disabled = true;
  const started = performance.now();
  try {
    if (!image) await useSample();
    const body = await callApi('/v1/featuremaps', { method: 'POST', signal, body: formWith(image.blob, image.name, { spec }) });
    clearProblem($('fm-problem'));
    markInvalid(null);
    renderStages(results, body, colormap);
    const { height, width, channels } = body.input;
    const ms = Math.round(performance.now() - started);
    $('fm-status').textContent = `Input ${channels} × ${height} × ${width}; ${body.stages.length} stages on ${body.device} in ${ms} ms.`;
    results.dataset.state = 'done';
  } catch (err) {
    if (signal.aborted) return;
    results.replaceChildren();
    $('fm-status').textContent = '';
    showProblem($('fm-problem'), problemOf(err));
    markInvalid(problemOf(err));
    results.dataset.state = 'error';
  } finally {
    if (!signal.aborted) {
      $('fm-run').disabled = false;
      results.setAttribute('aria-busy', 'false');
      results.dataset.run = Number(results.dataset.run) + 1;
    }
  }
}

function initImagePicker() {
  const drop = $('fm-drop');
  const take = (file) => {
    if (!file) return;
    useImage(file, file.name);
    run();
  };
  drop.addEventListener('dragover', (event) => {
    event.preventDefault();
    drop.classList.add('over');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (event) => {
    event.preventDefault();
    drop.classList.remove('over');
    take(event.dataTransfer.files[0]);
  });
  $('fm-file').addEventListener('change', (event) => {
    take(event.target.files[0]);
    event.target.value = '';
  });
  $('fm-sample').addEventListener('click', () => useSample().then(run, (err) => showProblem($('fm-problem'), problemOf(err))));
}

function initApiKey() {
  const input = $('api-key');
  input.value = storedApiKey();
  setApiKey(input.value);
  const apply = () => {
    setApiKey(input.value);
    input.classList.remove('wanted');
    if (!catalogue) loadCatalogue().then(() => catalogue && run());
  };
  input.addEventListener('change', apply);
  $('key-form').addEventListener('submit', (event) => {
    event.preventDefault();
    apply();
  });
}

async function main() {
  initApiKey();
  initImagePicker();
  attachReadout($('fm-results'), $('fm-readout'));
  $('fm-form').addEventListener('submit', (event) => {
    event.preventDefault();
    run();
  });
  $('fm-reset').addEventListener('click', () => editor.reset());
  for (const button of document.querySelectorAll('[data-add]')) button.addEventListener('click', () => editor.add(button.dataset.add));
  $('fm-add-other').addEventListener('change', (event) => {
    if (event.target.value) editor.add(event.target.value);
    event.target.value = '';
  });
  initDigits();
  await Promise.all([loadCatalogue(), loadColormaps().catch(() => {}), useSample().catch(() => {})]);
  document.body.dataset.ready = 'true';
  run(); // the tutorial's figures at once
}

main();
