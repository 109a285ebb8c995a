// trainbox dashboard: plain JS, no build step, no CDN. Everything it shows comes from /api/*;
// /api/stream (Server-Sent Events) pushes status and metric lines, so nothing is polled but the
// system panel. On every (re)connection the page fetches the full state again, which is how it
// reattaches after a server or browser restart.
"use strict";

const TOKEN_KEY = "trainbox-token";
const MAX_CLIENT_POINTS = 6000; // beyond this the page asks the server for a downsampled history again
const $ = (id) => document.getElementById(id);

const S = {
  job: null, // job id whose metrics are shown
  train: [],
  evals: [],
  lastTrain: -1,
  lastEval: -1,
  queueKey: "",
  lastEventId: 0,
  es: null,
  loadingJob: null,
};

// ---------- helpers ----------

function token() { return localStorage.getItem(TOKEN_KEY) || ""; }

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  const res = await fetch(path, Object.assign({}, opts, { headers }));
  if (!res.ok) {
    let detail = res.statusText;
    try { detail = (await res.json()).detail || detail; } catch (_) { /* not JSON */ }
    const err = new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
    err.status = res.status;
    throw err;
  }
  return res.json();
}

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function num(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  if (Math.abs(v) !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return Number(v).toExponential(2);
  return Number(v).toFixed(digits).replace(/\.?0+$/, "") || "0";
}
function duration(s) {
  if (s === null || s === undefined) return "—";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
}
function bytes(n) {
  if (!n && n !== 0) return "—";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}
function when(t) {
  if (!t) return "—";
  const d = new Date(t * 1000);
  return d.toLocaleDateString() === new Date().toLocaleDateString() ? d.toLocaleTimeString() : d.toLocaleString();
}
let toastTimer = null;
function toast(msg, error = false) {
  const t = $("toast");
  t.textContent = msg;
  t.className = "show" + (error ? " error" : "");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.className = ""; }, 3500);
}
function rows(tbody, html, cols, emptyText) {
  tbody.innerHTML = html || `<tr class="empty"><td colspan="${cols}">${emptyText}</td></tr>`;
}

// ---------- chart (canvas, drawn by hand) ----------

function drawChart(canvas, series) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  canvas.dataset.points = String(series.reduce((n, s) => n + s.points.length, 0));
  const pad = { l: 54, r: 10, t: 10, b: 22 };
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#8a96a5";
  if (!all.length) {
    ctx.fillText("no data yet", w / 2 - 30, h / 2);
    return;
  }
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += Math.abs(y1) * 0.05 || 1; y0 -= Math.abs(y0) * 0.05 || 1; }
  const m = (y1 - y0) * 0.05; y0 -= m; y1 += m;
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (w - pad.l - pad.r);
  const Y = (y) => pad.t + (1 - (y - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  ctx.strokeStyle = "#232b35";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + ((y1 - y0) * i) / 4, yy = Y(yv);
    ctx.beginPath(); ctx.moveTo(pad.l, yy); ctx.lineTo(w - pad.r, yy); ctx.stroke();
    ctx.fillText(num(yv, 3), 4, yy + 4);
  }
  for (let i = 0; i <= 4; i++) {
    const xv = x0 + ((x1 - x0) * i) / 4;
    ctx.fillText(String(Math.round(xv)), Math.min(X(xv) - 8, w - pad.r - 30), h - 6);
  }
  for (const s of series) {
    const pts = s.points.filter((p) => Number.isFinite(p[1]));
    if (!pts.length) continue;
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    pts.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
    ctx.stroke();
    if (s.dots || pts.length < 40) {
      for (const p of pts) { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), s.dots ? 2.5 : 1.5, 0, 7); ctx.fill(); }
    }
    for (const p of pts) {
      if (p[2]) { ctx.fillStyle = "#b197fc"; ctx.fillRect(X(p[0]) - 2, Y(p[1]) - 2, 4, 4); ctx.fillStyle = s.color; }
    }
  }
}

function drawCharts() {
  const pt = (key) => S.train.filter((p) => p[key] !== undefined && p[key] !== null).map((p) => [p.step, p[key], p.predicted]);
  drawChart($("loss-chart"), [
    { points: pt("loss"), color: "#4aa3ff" },
    { points: S.evals.map((p) => [p.step, p.val_loss]), color: "#ffa94d", dots: true },
  ]);
  drawChart($("lr-chart"), [{ points: pt("lr"), color: "#51cf66" }]);
  drawChart($("gradnorm-chart"), [{ points: pt("grad_norm"), color: "#e599f7" }]);
}

async function loadMetrics(jobId) {
  S.loadingJob = jobId;
  try {
    const m = await api(`/api/jobs/${jobId}/metrics?max_points=2000`);
    if (S.job !== jobId) return;
    S.train = m.train;
    S.evals = m.eval;
    S.lastTrain = m.train.length ? m.train[m.train.length - 1].step : -1;
    S.lastEval = m.eval.length ? m.eval[m.eval.length - 1].step : -1;
    drawCharts();
  } catch (e) {
    if (e.status !== 404) console.warn("metrics", e);
  } finally {
    if (S.loadingJob === jobId) S.loadingJob = null;
  }
}

function showJob(jobId) {
  if (jobId === S.job) return;
  S.job = jobId;
  S.train = []; S.evals = []; S.lastTrain = -1; S.lastEval = -1;
  drawCharts();
  if (jobId !== null && jobId !== undefined) loadMetrics(jobId);
}

function appendMetrics(msg) {
  if (msg.job_id !== S.job) { showJob(msg.job_id); return; }
  for (const p of msg.train) if (p.step > S.lastTrain) { S.train.push(p); S.lastTrain = p.step; }
  for (const p of msg.eval) if (p.step > S.lastEval) { S.evals.push(p); S.lastEval = p.step; }
  if (S.train.length > MAX_CLIENT_POINTS && S.loadingJob === null) loadMetrics(S.job);
  drawCharts();
}

// ---------- panels ----------

function renderStatus(st) {
  const d = st.daemon, ds = d.status;
  const badge = $("daemon-state");
  const state = d.liveness === "up" && ds ? ds.state : d.liveness;
  badge.textContent = d.liveness === "up" && ds ? `daemon ${ds.state}` : `daemon ${d.liveness}`;
  badge.dataset.state = state;
  const detail = [];
  if (ds && ds.pid) detail.push(`pid ${ds.pid}`);
  if (d.heartbeat_age_s !== null && d.heartbeat_age_s !== undefined) detail.push(`heartbeat ${d.heartbeat_age_s.toFixed(1)}s ago`);
  if (st.pending_controls.length) detail.push(`pending: ${st.pending_controls.join(", ")}`);
  if (ds && ds.message) detail.push(ds.message);
  $("daemon-detail").textContent = detail.join(" · ");
  $("btn-pause").disabled = !!(ds && ds.paused && d.alive);
  $("btn-resume").disabled = !!(ds && !ds.paused && d.alive);

  const tv = st.training;
  const t = tv ? tv.status : null;
  const live = tv && (tv.current || tv.active);
  const currentId = ds && ds.current_job !== null && ds.current_job !== undefined ? ds.current_job : t ? t.job_id : null;
  $("job-name").textContent = ds && ds.current_job_name ? `#${ds.current_job} ${ds.current_job_name}` : t ? `#${t.job_id} ${t.job_name}` : "no job yet";
  const phase = $("job-phase");
  phase.textContent = t ? (live ? t.phase : `${t.phase} (last job)`) : "idle";
  phase.dataset.state = t ? t.phase : "none";
  const pct = tv && tv.progress !== null ? tv.progress * 100 : 0;
  $("job-progress-bar").style.width = `${pct.toFixed(1)}%`;
  $("job-step").textContent = t ? `${t.step} / ${t.total_steps || "?"}` : "—";
  $("job-eta").textContent = t && live ? duration(t.eta_s) : "—";
  $("job-tps").textContent = t && t.tokens_per_s ? Math.round(t.tokens_per_s).toLocaleString() : "—";
  $("job-loss").textContent = t ? num(t.loss) : "—";
  $("job-val-loss").textContent = t ? num(t.val_loss) : "—";
  $("job-lr").textContent = t ? num(t.learning_rate) : "—";
  $("job-grad-norm").textContent = t ? num(t.grad_norm, 3) : "—";
  $("job-device").textContent = t ? `${t.device || "?"} · ${t.engine} · epoch ${t.epoch}` : "—";
  $("job-message").textContent = t && t.message ? t.message : "";
  if (currentId !== null && currentId !== S.job) showJob(currentId);

  const key = JSON.stringify(st.queue);
  if (key !== S.queueKey) { S.queueKey = key; refreshLists(); }
}

async function refreshQueue() {
  const q = await api("/api/queue");
  const c = q.counts;
  $("queue-counts").textContent = `high ${c.high} · normal ${c.normal} · low ${c.low} · done ${c.done} · failed ${c.failed}`;
  const actions = (j) => (j.position == null ? "" : `<select class="job-priority" aria-label="priority of job ${j.job_id}">
      ${["high", "normal", "low"].map((p) => `<option${p === j.priority ? " selected" : ""}>${p}</option>`).join("")}</select>
      <button class="job-cancel" title="cancel this waiting job">✕</button>`);
  const html = [...q.processing, ...q.waiting].map((j) => `<tr data-job="${j.job_id}">
      <td class="num">${j.position ?? "▶"}</td><td class="name" title="${esc(j.name)}">#${j.job_id} ${esc(j.name)}</td><td>${esc(j.priority)}</td>
      <td class="outcome-${esc(j.state)}">${esc(j.state)}</td><td class="num">${j.n_records ?? "—"}</td>
      <td class="actions">${actions(j)}</td></tr>`).join("");
  rows($("queue-table").tBodies[0], html, 6, "nothing waiting");
  return q;
}

async function refreshJobs(q) {
  const jobs = await api("/api/jobs?limit=30");
  const reasons = {};
  for (const f of (q ? q.failed : [])) if (f.job_id !== null) reasons[f.job_id] = f.reason;
  const html = jobs.map((j) => {
    const reason = reasons[j.id] || j.error || "";
    return `<tr data-job="${j.id}"><td class="num">${j.id}</td><td class="name" title="${esc(j.name)}">${esc(j.name)}</td>
      <td class="outcome-${esc(j.state)}">${esc(j.state)}${reason ? `<span class="reason">${esc(reason)}</span>` : ""}</td>
      <td>${j.version ? "v" + j.version : "—"}</td><td>${when(j.finished_at)}</td></tr>`;
  }).join("");
  rows($("jobs-table").tBodies[0], html, 5, "no jobs yet");
}

async function refreshModels() {
  const models = await api("/api/models");
  const html = models.map((v) => `<tr><td>v${v.id}${v.current ? '<span class="tag">current</span>' : ""}</td>
      <td>${v.parent_id ? "v" + v.parent_id : esc(v.base_model ? "base" : "—")}</td>
      <td>${v.job_id ? "#" + v.job_id + " " + esc(v.job_name || "") : "—"}</td><td class="num">${v.steps}</td>
      <td class="num">${num(v.train_loss)}</td><td class="num">${num(v.val_loss)}</td></tr>`).join("");
  rows($("models-table").tBodies[0], html, 6, "no model versions yet");
}

async function refreshSystem() {
  const s = await api("/api/system");
  const meter = (id, pct, text) => { $(id + "-bar").style.width = `${Math.min(100, pct)}%`; $(id).textContent = text; };
  meter("sys-cpu", s.cpu_percent, `${s.cpu_percent.toFixed(0)}% of ${s.cpu_count} cores`);
  meter("sys-ram", s.ram_percent, `${bytes(s.ram_used_bytes)} / ${bytes(s.ram_total_bytes)}`);
  meter("sys-disk", s.disk_percent, `${bytes(s.disk_free_bytes)} free`);
  $("sys-gpus").innerHTML = s.gpus.length
    ? s.gpus.map((g) => `<div class="gpu"><b>GPU ${g.index}</b> ${esc(g.name)}<br>
        util ${g.utilization_percent ?? "—"}% · ${bytes(g.memory_used_bytes)} / ${bytes(g.memory_total_bytes)}
        · ${g.temperature_c ?? "—"}°C · ${g.power_w ? g.power_w.toFixed(0) + " W" : "—"}</div>`).join("")
    : `<div class="gpu muted" id="sys-no-gpu">${esc(s.gpu_state)}</div>`;
}

function renderEvents(events, replace) {
  const list = $("events-list");
  if (replace) list.innerHTML = "";
  for (const e of events) {
    if (e.id <= S.lastEventId && !replace) continue;
    S.lastEventId = Math.max(S.lastEventId, e.id);
    const li = document.createElement("li");
    const warn = /warn|fail|error/i.test(e.kind);
    li.innerHTML = `<span class="muted">${new Date(e.time * 1000).toLocaleTimeString()}</span>
      <span class="${warn ? "warn" : "kind"}">${esc(e.kind)}</span><span class="muted">${e.job_id ? "#" + e.job_id : ""}</span>
      <span>${esc(e.message)}</span>`;
    list.prepend(li);
  }
  while (list.children.length > 200) list.lastChild.remove();
}

async function refreshEvents() {
  const events = await api("/api/events?limit=100");
  S.lastEventId = 0;
  renderEvents(events, true);
}

let listsPending = null;
function refreshLists() {
  // coalesce bursts (several SSE messages at once) into one round of requests
  if (listsPending) return listsPending;
  listsPending = (async () => {
    try {
      const q = await refreshQueue();
      await Promise.all([refreshJobs(q), refreshModels()]);
    } catch (e) {
      if (e.status === 401) toast("this server requires the API token for reads: click Token", true);
    } finally {
      listsPending = null;
    }
  })();
  return listsPending;
}

async function refreshAll() {
  try {
    renderStatus(await api("/api/status"));
  } catch (e) { /* the stream will bring it */ }
  await Promise.allSettled([refreshLists(), refreshSystem(), refreshEvents()]);
  if (S.job !== null) loadMetrics(S.job);
}

// ---------- stream ----------

function setConn(state, text) { const c = $("conn-state"); c.dataset.state = state; c.textContent = text; }

function connect() {
  if (S.es) S.es.close();
  const url = "/api/stream" + (token() ? "?token=" + encodeURIComponent(token()) : "");
  const es = new EventSource(url);
  S.es = es;
  es.addEventListener("open", () => { setConn("live", "live"); refreshAll(); });
  es.addEventListener("status", (e) => renderStatus(JSON.parse(e.data)));
  es.addEventListener("metrics", (e) => appendMetrics(JSON.parse(e.data)));
  es.addEventListener("reset", (e) => { const m = JSON.parse(e.data); if (m.job_id === S.job) loadMetrics(S.job); });
  es.addEventListener("events", (e) => { renderEvents(JSON.parse(e.data), false); refreshLists(); });
  es.addEventListener("error", () => {
    setConn("connecting", "reconnecting…");
    // EventSource retries by itself after network errors, but gives up on an HTTP error: start over
    if (es.readyState === EventSource.CLOSED) setTimeout(() => { if (S.es === es) connect(); }, 2000);
  });
}

// ---------- controls ----------

function askToken() {
  const t = window.prompt("API token (print it with `trainbox token`):", "");
  if (t && t.trim()) { localStorage.setItem(TOKEN_KEY, t.trim()); return t.trim(); }
  return "";
}

async function withToken(fn) {
  if (!token() && !askToken()) return;
  try {
    await fn();
  } catch (e) {
    if (e.status === 401) {
      localStorage.removeItem(TOKEN_KEY);
      toast("token refused: click again to enter it", true);
    } else {
      toast(e.message, true);
    }
  }
}

function control(action) {
  withToken(async () => {
    await api(`/api/control/${action}`, { method: "POST" });
    toast(`${action} requested`);
  });
}

function upload() {
  const file = $("upload-file").files[0];
  if (!file) { toast("choose a .jsonl file first", true); return; }
  const priority = $("upload-priority").value;
  withToken(async () => {
    const r = await api(`/api/upload?priority=${priority}&filename=${encodeURIComponent(file.name)}`, {
      method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" },
    });
    toast(`uploaded ${r.file} to inbox/${r.priority}`);
    $("upload-file").value = "";
  });
}

$("btn-pause").addEventListener("click", () => control("pause"));
$("btn-resume").addEventListener("click", () => control("resume"));
$("btn-stop").addEventListener("click", () => { if (window.confirm("Stop the daemon? The running job is checkpointed first.")) control("stop"); });
$("btn-token").addEventListener("click", () => {
  if (token() && window.confirm("Forget the stored API token?")) { localStorage.removeItem(TOKEN_KEY); toast("token forgotten"); return; }
  if (askToken()) { toast("token stored"); connect(); }
});
$("btn-upload").addEventListener("click", upload);
// cancel / reprioritise a waiting job: the same control path as `trainbox cancel|prioritize`
$("queue-table").addEventListener("click", (ev) => {
  const btn = ev.target.closest(".job-cancel");
  if (!btn) return;
  const job = btn.closest("tr").dataset.job;
  if (!window.confirm(`Cancel waiting job #${job}?`)) return;
  withToken(async () => { await api(`/api/jobs/${job}/cancel`, { method: "POST" }); toast(`cancel of job ${job} requested`); });
});
$("queue-table").addEventListener("change", (ev) => {
  const sel = ev.target.closest(".job-priority");
  if (!sel) return;
  const job = sel.closest("tr").dataset.job;
  withToken(async () => {
    await api(`/api/jobs/${job}/priority?priority=${sel.value}`, { method: "POST" });
    toast(`job ${job} to ${sel.value} requested`);
  });
});
window.addEventListener("resize", drawCharts);
setInterval(() => refreshSystem().catch(() => {}), 5000);

drawCharts();
connect();
