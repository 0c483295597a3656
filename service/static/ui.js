// Small DOM helpers shared by the page's modules, and how an API problem is shown.

/** Creates an element: h('p', {class: 'x'}, 'text', child). Null, undefined and false children are skipped. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'class') el.className = value;
    else el.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Shows an RFC 9457 problem: its title and detail, each field error, and a link to what its type means. */
export function showProblem(el, problem) {
  const detail = problem.detail ?? '';
  const errors = Array.isArray(problem.errors) ? problem.errors : [];
  const extra = errors.filter((e) => !detail.includes(e.detail));
  const status = problem.status ? h('span', { class: 'problem-status' }, problem.status) : null;
  el.replaceChildren(
    h('p', { class: 'problem-head' }, status, h('strong', { class: 'problem-title' }, problem.title)),
    h('p', { class: 'problem-detail' }, detail),
  );
  if (errors.length > 1 || extra.length) {
    el.append(h('ul', { class: 'problem-errors' }, errors.map((e) => h('li', {}, h('code', {}, e.field), ': ', e.detail))));
  }
  if (problem.status === 401) {
    el.append(h('p', { class: 'hint' }, 'Enter a key in the API key field at the top of the page, then try again.'));
    document.getElementById('api-key')?.classList.add('wanted');
  }
  if (typeof problem.type === 'string' && problem.type.startsWith('/problems/')) {
    el.append(h('p', { class: 'hint' }, h('a', { href: problem.type, target: '_blank' }, 'What this error means')));
  }
  el.hidden = false;
}

export function clearProblem(el) {
  el.hidden = true;
  el.replaceChildren();
}

/** A number for display: few digits, no exponent for everyday sizes. */
export function fmt(value) {
  if (!Number.isFinite(value)) return String(value);
  if (value === 0) return '0';
  const abs = Math.abs(value);
  if (abs >= 1e5 || abs < 1e-3) return value.toExponential(2);
  return Number(value.toPrecision(4)).toString();
}
