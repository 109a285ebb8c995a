// trainbox dashboard charts: line charts drawn by hand on <canvas> (no library, no CDN).
// The y axis gets "nice" ticks (1, 2 or 5 times a power of ten) labelled with just enough digits
// to tell them apart, so a learning rate of 3e-4 never shows five labels reading "3.00e-4"; a series
// that cannot go negative (loss, learning rate, gradient norm) never gets an axis below 0.
"use strict";

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const norm = raw / mag;
  return (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
}

// Tick values covering [lo, hi]: multiples of a nice step, at most about `count` + 1 of them.
function niceTicks(lo, hi, count = 4) {
  const step = niceStep(hi - lo, count);
  const first = Math.ceil(lo / step - 1e-9), last = Math.floor(hi / step + 1e-9);
  const ticks = [];
  for (let k = first; k <= last; k++) ticks.push(k * step);
  return { ticks, step };
}

// A label precise enough that ticks `step` apart never read the same; `top` (the largest tick's
// magnitude) picks the notation and the digits, so one axis's labels all look alike.
function tickLabel(v, step, top) {
  if (Math.abs(v) < step * 1e-6) return "0";
  if (top >= 1e5 || top < 1e-3) {
    // mantissa digits down to the step's decade, the same for every label of the axis
    const digits = Math.max(0, Math.floor(Math.log10(top) + 1e-9) - Math.floor(Math.log10(step) + 1e-9));
    return v.toExponential(Math.min(digits, 6));
  }
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  return v.toFixed(Math.min(decimals, 8));
}

// The y range to draw: the data's, padded 5 %, not below 0 when no value is negative.
function yRange(values) {
  let y0 = Math.min(...values), y1 = Math.max(...values);
  const nonNegative = y0 >= 0;
  if (y1 === y0) { y1 += Math.abs(y1) * 0.05 || 1; y0 -= Math.abs(y0) * 0.05 || 1; }
  const m = (y1 - y0) * 0.05;
  y0 -= m; y1 += m;
  if (nonNegative && y0 < 0) y0 = 0;
  return [y0, y1];
}

function sizeCanvas(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#8a96a5";
  return { ctx, w, h };
}

function drawAxes(ctx, frame) {
  const { w, h, pad, x0, x1, y0, y1, X, Y } = frame;
  const { ticks, step } = niceTicks(y0, y1, 5);
  const top = Math.max(...ticks.map((v) => Math.abs(v)));
  const labels = ticks.map((v) => tickLabel(v, step, top));
  ctx.strokeStyle = "#232b35";
  ctx.lineWidth = 1;
  ticks.forEach((v, i) => {
    const yy = Y(v);
    ctx.beginPath(); ctx.moveTo(pad.l, yy); ctx.lineTo(w - pad.r, yy); ctx.stroke();
    ctx.fillText(labels[i], 4, yy + 4);
  });
  const xt = niceTicks(x0, x1, Math.max(2, Math.floor((w - pad.l - pad.r) / 80))); // labels never touch
  const xLabels = xt.ticks.filter((v) => Math.abs(v - Math.round(v)) < 1e-9).map((v) => String(Math.round(v)));
  for (const label of new Set(xLabels)) {
    const x = X(Number(label)) - ctx.measureText(label).width / 2;
    if (x + ctx.measureText(label).width <= w - 2) ctx.fillText(label, x, h - 6); // a label cut at the edge is left out
  }
  return labels;
}

function drawSeries(ctx, s, X, Y) {
  const pts = s.points.filter((p) => Number.isFinite(p[1]));
  if (!pts.length) return;
  ctx.strokeStyle = s.color;
  ctx.fillStyle = s.color;
  ctx.lineWidth = 1.5;
  ctx.setLineDash(s.dash || []);
  ctx.beginPath();
  pts.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
  ctx.stroke();
  ctx.setLineDash([]);
  if (s.dots || (!s.dash && pts.length < 40)) {
    for (const p of pts) { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), s.dots ? 2.5 : 1.5, 0, 7); ctx.fill(); }
  }
}

// series: [{points: [[x, y], ...], color, dots?, dash?}]. The canvas's data-points and data-yticks
// say what was drawn (the browser tests read them).
function drawChart(canvas, series) {
  const { ctx, w, h } = sizeCanvas(canvas);
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  canvas.dataset.points = String(series.reduce((n, s) => n + s.points.length, 0));
  if (!all.length) {
    canvas.dataset.yticks = "[]";
    ctx.fillText("no data yet", w / 2 - 30, h / 2);
    return;
  }
  const pad = { l: 58, r: 10, t: 10, b: 22 };
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  if (x1 === x0) x1 = x0 + 1;
  const [y0, y1] = yRange(all.map((p) => p[1]));
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (w - pad.l - pad.r);
  const Y = (y) => pad.t + (1 - (y - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  const labels = drawAxes(ctx, { w, h, pad, x0, x1, y0, y1, X, Y });
  canvas.dataset.yticks = JSON.stringify(labels);
  canvas.dataset.ymin = String(y0);
  for (const s of series) drawSeries(ctx, s, X, Y);
}
