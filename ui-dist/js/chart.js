// Small line charts as inline SVG: a time axis, one or more series, and
// vertical markers (restarts) at their own times. Hand-written rather than a
// charting library: the status page needs only this, it is about a hundred
// lines, and colours come from the stylesheet's variables, so both themes
// work without configuration. The SVG scales to its container's width.

const SVG = 'http://www.w3.org/2000/svg';
const HEIGHT = 160;
const PAD = { left: 44, right: 8, top: 10, bottom: 22 };

function el(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

/** "1.2k", "35", "0.8" */
export function formatTick(value) {
  if (!Number.isFinite(value)) return '';
  const abs = Math.abs(value);
  if (abs >= 1000) return `${(value / 1000).toFixed(abs >= 10000 ? 0 : 1)}k`;
  if (abs >= 10 || value === 0) return String(Math.round(value));
  return value.toFixed(1);
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

/**
 * A chart element.
 * series: [{ name, className, points: [[unixMs, value|null], …] }]
 * markers: [{ unixMs, label }] drawn as vertical lines.
 * range: [fromMs, toMs] of the time axis.
 * width: the drawing's width in CSS pixels, so text keeps its size.
 */
export function lineChart({ title, unit, series, markers = [], range, width = 600 }) {
  const WIDTH = Math.max(240, Math.round(width));
  const [from, to] = range;
  const values = series.flatMap((s) => s.points.map((p) => p[1])).filter((v) => typeof v === 'number' && Number.isFinite(v));
  // An idle chart (all zero) still gets a readable 0…1 scale.
  const top = Math.max(0, ...values);
  const max = (top > 0 ? top : 1) * 1.1;
  const x = (t) => PAD.left + ((t - from) / Math.max(1, to - from)) * (WIDTH - PAD.left - PAD.right);
  const y = (v) => HEIGHT - PAD.bottom - (v / max) * (HEIGHT - PAD.top - PAD.bottom);
  const svg = el('svg', { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: 'chart-svg', role: 'img', 'aria-label': `${title}${unit ? ` (${unit})` : ''}` });
  // Grid: zero, half, top.
  for (const v of [0, max / 2, max / 1.1]) {
    svg.append(el('line', { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(v), y2: y(v), class: 'chart-grid' }));
    svg.append(el('text', { x: PAD.left - 6, y: y(v) + 4, class: 'chart-tick', 'text-anchor': 'end' }, document.createTextNode(formatTick(v))));
  }
  svg.append(el('text', { x: PAD.left, y: HEIGHT - 6, class: 'chart-tick' }, document.createTextNode(clock(from))));
  svg.append(el('text', { x: WIDTH - PAD.right, y: HEIGHT - 6, class: 'chart-tick', 'text-anchor': 'end' }, document.createTextNode(clock(to))));
  for (const s of series) {
    // A gap (null) breaks the line rather than drawing through zero.
    let d = '';
    let pen = 'M';
    for (const [t, v] of s.points) {
      if (typeof v !== 'number' || t < from) { pen = 'M'; continue; }
      d += `${pen}${x(t).toFixed(1)},${y(v).toFixed(1)} `;
      pen = 'L';
    }
    if (d) svg.append(el('path', { d, class: `chart-line ${s.className || ''}`, 'data-series': s.name }));
    // A point with no neighbour (the first sample, or one between gaps) as a dot.
    s.points.forEach(([t, v], i) => {
      const alone = (p) => !p || typeof p[1] !== 'number' || p[0] < from;
      if (typeof v === 'number' && t >= from && alone(s.points[i - 1]) && alone(s.points[i + 1])) {
        svg.append(el('circle', { cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 3, class: `chart-dot ${s.className || ''}` }));
      }
    });
  }
  for (const m of markers) {
    if (m.unixMs < from || m.unixMs > to + 60000) continue;
    const mx = Math.min(x(m.unixMs), WIDTH - PAD.right);
    const line = el('line', { x1: mx, x2: mx, y1: PAD.top, y2: HEIGHT - PAD.bottom, class: 'chart-marker', 'data-marker': 'restart' });
    line.append(el('title', {}, document.createTextNode(m.label)));
    svg.append(line);
  }
  const legend = document.createElement('p');
  legend.className = 'chart-legend';
  for (const s of series) {
    const key = document.createElement('span');
    key.className = `chart-key ${s.className || ''}`;
    key.textContent = s.name;
    legend.append(key);
  }
  if (markers.length) {
    const key = document.createElement('span');
    key.className = 'chart-key chart-key-marker';
    key.textContent = 'restart';
    legend.append(key);
  }
  const figure = document.createElement('figure');
  figure.className = 'chart';
  const caption = document.createElement('figcaption');
  caption.textContent = unit ? `${title} (${unit})` : title;
  figure.append(caption, svg, legend);
  return figure;
}
