// trainbox dashboard: plain JS, no build step, no CDN. Everything it shows comes from /api/*;
// /api/stream (Server-Sent Events) pushes status and metric lines, so nothing is polled but the
// system and fleet panels. On every (re)connection the page fetches the full state again, which is how it
// reattaches after a server or browser restart.
"use strict";

const TOKEN_KEY = "trainbox-token";
const MAX_CLIENT_POINTS = 6000; // beyond this the page asks the server for a downsampled history again
const ENDED = new Set(["done", "failed", "cancelled"]); // job states that have a report (daemon/reports.py)
const QUEUE_ROWS = 20; // waiting jobs shown per priority queue; the rest are counted, not listed
const PRIORITIES = ["high", "normal", "low"];
const $ = (id) => document.getElementById(id);

const S = {
  job: null, // job id whose metrics are shown
  train: [],
  evals: [],
  predicted: [], // [[step, loss], ...]: the hybrid engine's latest fitted validation curve
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

// Names and messages come from whoever dropped a file: a bidi override (U+202E) would show
// "invoice\u202Egnp.exe" as "invoiceexe.png", and control characters are invisible. Every such
// character is shown as its code point instead, so what is displayed is what is there.
// (Unicode categories Cc, Cf, Cs, Zl, Zp: controls, format characters such as the bidi overrides and
// isolates and zero-width ones, lone surrogates, line and paragraph separators.)
const UNSHOWABLE = /[\p{Cc}\p{Cf}\p{Cs}\p{Zl}\p{Zp}]/gu;
function clean(s) {
  return String(s ?? "").replace(UNSHOWABLE, (c) => `[U+${c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}]`);
}
function esc(s) {
  return clean(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
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
  t.textContent = clean(msg);
  t.className = "show" + (error ? " error" : "");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.className = ""; }, 3500);
}
function rows(tbody, html, cols, emptyText) {
  tbody.innerHTML = html || `<tr class="empty"><td colspan="${cols}">${emptyText}</td></tr>`;
}

// ---------- charts (drawChart: chart.js) ----------

function drawCharts() {
  const pt = (key) => S.train.filter((p) => p[key] !== undefined && p[key] !== null).map((p) => [p.step, p[key]]);
  drawChart($("loss-chart"), [
    { points: pt("loss"), color: "#4aa3ff" },
    { points: S.evals.map((p) => [p.step, p.val_loss]), color: "#ffa94d", dots: true },
    { points: S.predicted, color: "#b197fc", dash: [5, 4] }, // the hybrid engine's fitted curve, to its expected stop
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
    S.predicted = m.predicted || [];
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
  S.train = []; S.evals = []; S.predicted = []; S.lastTrain = -1; S.lastEval = -1;
  drawCharts();
  if (jobId !== null && jobId !== undefined) loadMetrics(jobId);
}

function appendMetrics(msg) {
  if (msg.job_id !== S.job) { showJob(msg.job_id); return; }
  for (const p of msg.train) if (p.step > S.lastTrain) { S.train.push(p); S.lastTrain = p.step; }
  for (const p of msg.eval) if (p.step > S.lastEval) { S.evals.push(p); S.lastEval = p.step; }
  if (msg.predicted) S.predicted = msg.predicted;
  if (S.train.length > MAX_CLIENT_POINTS && S.loadingJob === null) loadMetrics(S.job);
  drawCharts();
}

// ---------- panels ----------

function renderDaemon(st) {
  const d = st.daemon, ds = d.status;
  const badge = $("daemon-state");
  badge.textContent = d.liveness === "up" && ds ? `daemon ${ds.state}` : `daemon ${d.liveness}`;
  badge.dataset.state = d.liveness === "up" && ds ? ds.state : d.liveness;
  const detail = [];
  if (ds && ds.pid) detail.push(`pid ${ds.pid}`);
  if (d.heartbeat_age_s !== null && d.heartbeat_age_s !== undefined) detail.push(`heartbeat ${d.heartbeat_age_s.toFixed(1)}s ago`);
  if (st.pending_controls.length) detail.push(`pending: ${st.pending_controls.join(", ")}`);
  if (ds && ds.message) detail.push(ds.message);
  $("daemon-detail").textContent = clean(detail.join(" · "));
  // inbox entries the daemon never opens or moves (symlinks, FIFOs, folders): said, not hidden
  const refused = (ds && ds.inbox_refused) || [];
  const list = $("inbox-refused");
  list.hidden = !refused.length;
  list.innerHTML = refused.length
    ? `<li class="muted">left in the inbox, never opened or moved:</li>` + refused.map((r) => `<li><bdi>${esc(r)}</bdi></li>`).join("")
    : "";
  $("btn-pause").disabled = !!(ds && ds.paused && d.alive);
  $("btn-resume").disabled = !!(ds && !ds.paused && d.alive);
}

// Which job the card shows, and whether training.json is about it. The daemon names its current job
// before the new worker writes its first status, so for a moment training.json still holds the
// previous job ("finished 5 / 5"): that must not be shown as the new job's progress.
function jobShown(st) {
  const ds = st.daemon.status, tv = st.training, t = tv ? tv.status : null;
  const current = ds && ds.current_job !== null && ds.current_job !== undefined ? ds.current_job : null;
  if (current !== null && (!t || t.job_id !== current)) {
    return { id: current, name: `#${current} ${ds.current_job_name || ""}`, t: null, tv: null, loading: true };
  }
  if (t) return { id: t.job_id, name: `#${t.job_id} ${t.job_name}`, t, tv, loading: false };
  return { id: null, name: "no job yet", t: null, tv: null, loading: false };
}

function renderJob(st) {
  const job = jobShown(st), t = job.t, tv = job.tv;
  const live = tv && (tv.current || tv.active);
  $("job-name").textContent = clean(job.name);
  const phase = $("job-phase");
  phase.textContent = job.loading ? "loading" : t ? (live ? t.phase : `${t.phase} (last job)`) : "idle";
  phase.dataset.state = job.loading ? "loading" : t ? t.phase : "none";
  const pct = tv && tv.progress !== null ? tv.progress * 100 : 0;
  $("job-progress-bar").style.width = `${pct.toFixed(1)}%`;
  $("job-step").textContent = job.loading ? "starting…" : t ? `${t.step} / ${t.total_steps || "?"}` : "—";
  $("job-eta").textContent = t && live ? duration(t.eta_s) : "—";
  $("job-tps").textContent = t && t.tokens_per_s ? Math.round(t.tokens_per_s).toLocaleString() : "—";
  $("job-loss").textContent = t ? num(t.loss) : "—";
  $("job-val-loss").textContent = t ? num(t.val_loss) : "—";
  $("job-lr").textContent = t ? num(t.learning_rate) : "—";
  $("job-grad-norm").textContent = t ? num(t.grad_norm, 3) : "—";
  $("job-device").textContent = t ? clean(`${t.device || "?"} · ${t.engine} · epoch ${t.epoch}`) : "—";
  $("job-message").textContent = job.loading ? "loading the model and data…" : t && t.message ? clean(t.message) : "";
  if (job.id !== null && job.id !== S.job) showJob(job.id);
}

function renderStatus(st) {
  renderDaemon(st);
  renderJob(st);
  const key = JSON.stringify(st.queue);
  if (key !== S.queueKey) { S.queueKey = key; refreshLists(); }
}

function queueRow(j) {
  const waiting = j.position !== null && j.position !== undefined;
  const prio = waiting
    ? `<select class="job-priority" aria-label="priority of job ${j.job_id}">${PRIORITIES.map(
        (p) => `<option${p === j.priority ? " selected" : ""}>${p}</option>`).join("")}</select>`
    : esc(j.priority);
  const cancel = waiting ? `<button class="job-cancel" title="cancel this waiting job" aria-label="cancel job ${j.job_id}">✕</button>` : "";
  return `<tr data-job="${j.job_id}"><td class="num">${waiting ? j.position : "▶"}</td>
    <td class="name" title="${esc(j.name)}"><bdi>#${j.job_id} ${esc(j.name)}</bdi></td><td>${prio}</td>
    <td class="outcome-${esc(j.state)}">${esc(j.state)}</td><td class="num">${j.n_records ?? "—"}</td>
    <td class="actions">${cancel}</td></tr>`;
}

// The first QUEUE_ROWS of each priority queue, each under a heading with its count: 10,000 waiting
// jobs are 3 x QUEUE_ROWS rows and a "N more" line, never 10,000 rows.
async function refreshQueue() {
  const q = await api(`/api/queue?limit=${QUEUE_ROWS}`);
  const c = q.counts;
  const n = (k) => (c[k] ?? 0).toLocaleString();
  $("queue-counts").textContent = `high ${n("high")} · normal ${n("normal")} · low ${n("low")} · done ${n("done")} · failed ${n("failed")}`;
  let html = q.processing.map(queueRow).join("");
  for (const p of PRIORITIES) {
    const mine = q.waiting.filter((j) => j.priority === p);
    if (!c[p] && !mine.length) continue;
    html += `<tr class="group" data-queue="${p}"><td colspan="6">${p} · ${c[p].toLocaleString()} waiting</td></tr>`;
    html += mine.map(queueRow).join("");
    const rest = c[p] - mine.length;
    if (rest > 0) html += `<tr class="more" data-queue="${p}"><td colspan="6">… and ${rest.toLocaleString()} more in ${p} (\`trainbox queue --all\` lists them)</td></tr>`;
  }
  rows($("queue-table").tBodies[0], html, 6, "nothing waiting");
  return q;
}

async function refreshJobs(q) {
  const jobs = (await api("/api/jobs?limit=30")).items;
  const reasons = {};
  for (const f of (q ? q.failed : [])) if (f.job_id !== null) reasons[f.job_id] = f.reason;
  const html = jobs.map((j) => {
    const reason = reasons[j.id] || j.error || "";
    // the job report (runs/job-N/report.md as a page); an <a> cannot send a header, so ?token= as the stream does
    const report = ENDED.has(j.state)
      ? ` <a class="report-link" href="/jobs/${j.id}/report${token() ? "?token=" + encodeURIComponent(token()) : ""}" target="_blank" rel="noopener">report</a>`
      : "";
    return `<tr data-job="${j.id}"><td class="num">${j.id}</td><td class="name" title="${esc(j.name)}"><bdi>${esc(j.name)}</bdi></td>
      <td class="outcome-${esc(j.state)}">${esc(j.state)}${report}${reason ? `<span class="reason">${esc(reason)}</span>` : ""}</td>
      <td>${j.version ? "v" + j.version : "—"}</td><td>${when(j.finished_at)}</td></tr>`;
  }).join("");
  rows($("jobs-table").tBodies[0], html, 5, "no jobs yet");
}

// lineages (issue 18): each a chain of versions with its own current one; the select shows one or all
let modelsCache = [];
async function refreshModels() {
  modelsCache = await api("/api/models");
  const pick = $("models-lineage");
  const names = [...new Set(modelsCache.map((v) => v.lineage || "main"))].sort((a, b) => (a !== "main") - (b !== "main") || a.localeCompare(b));
  const chosen = pick.value;
  pick.innerHTML = ["all", ...names].map((n) => `<option value="${esc(n)}">${n === "all" ? "all lineages" : esc(n)}</option>`).join("");
  pick.value = chosen && (chosen === "all" || names.includes(chosen)) ? chosen : "all";
  pick.hidden = names.length < 2 && !names.some((n) => n !== "main");
  showModels();
}

function showModels() {
  const chosen = $("models-lineage").value || "all";
  const models = modelsCache.filter((v) => chosen === "all" || (v.lineage || "main") === chosen);
  const line = (v) => (v.lineage && v.lineage !== "main" ? `<span class="tag">${esc(v.lineage)}</span>` : "");
  const html = models.map((v) => `<tr data-lineage="${esc(v.lineage || "main")}"><td>v${v.id}${line(v)}${v.current ? '<span class="tag">current</span>' : ""}</td>
      <td>${v.parent_id ? "v" + v.parent_id : esc(v.base_model ? "base" : "—")}</td>
      <td class="name" title="${esc(v.job_name || "")}">${v.job_id ? `<bdi>#${v.job_id} ${esc(v.job_name || "")}</bdi>` : "—"}</td><td class="num">${v.steps}</td>
      <td class="num">${num(v.train_loss)}</td><td class="num">${num(v.val_loss)}</td></tr>`).join("");
  rows($("models-table").tBodies[0], html, 6, "no model versions yet");
  drawMemory(models);
}

// the version x job matrix: each version's loss on every job's memory set, colour-scaled per job (column)
// from green (that job's lowest loss) to red (its highest), so forgetting shows as a column turning red
function memoryColour(loss, lo, hi) {
  const t = hi > lo ? (loss - lo) / (hi - lo) : 0;
  return `hsl(${Math.round(120 * (1 - t))}, 55%, 32%)`;
}

function drawMemory(models) {
  const names = new Map(models.filter((v) => v.job_id).map((v) => [String(v.job_id), v.job_name || ""]));
  const jobs = [...new Set(models.flatMap((v) => Object.keys(v.memory_losses || {})))].sort((a, b) => a - b);
  const table = $("memory-table");
  table.tHead.innerHTML = `<tr><th>version</th>${jobs.map((j) => `<th class="num" title="${esc(names.get(j) || "")}"><bdi>#${esc(j)} ${esc(names.get(j) || "")}</bdi></th>`).join("")}<th>trained on</th></tr>`;
  const range = new Map(jobs.map((j) => {
    const ls = models.map((v) => (v.memory_losses || {})[j]).filter((x) => x !== null && x !== undefined);
    return [j, [Math.min(...ls), Math.max(...ls)]];
  }));
  const html = jobs.length ? [...models].reverse().map((v) => `<tr data-version="${v.id}"><td>v${v.id}</td>${jobs.map((j) => {
    const loss = (v.memory_losses || {})[j];
    if (loss === null || loss === undefined) return '<td class="num">—</td>';
    const [lo, hi] = range.get(j);
    return `<td class="num memory-cell" data-loss="${loss}" style="background:${memoryColour(loss, lo, hi)}">${num(loss)}</td>`;
  }).join("")}<td>${(v.trained_on || []).map((j) => "#" + j).join(" › ")}</td></tr>`).join("") : "";
  rows(table.tBodies[0], html, jobs.length + 2, "no memory sets scored yet (the eval gate scores them)");
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

// the lineage lease a host holds (issue 18): its name, and in the tooltip the job, generation and time left;
// an expired one (its host stopped renewing) is struck through: another host may resume that job
function leaseCell(l) {
  if (!l) return "—";
  const when = l.expired ? `expired ${duration(-l.expires_in_s)} ago` : `${duration(l.expires_in_s)} left`;
  const tip = `${l.job_id ? "job #" + l.job_id + ", " : ""}generation ${l.generation}, ${when}`;
  return `<bdi class="${l.expired ? "expired" : ""}" title="${esc(tip)}">${esc(l.name)}</bdi>`;
}

// the daemons sharing this model DB (issue 18): one row per host, the stale and stopped ones too
async function refreshFleet() {
  const hosts = (await api("/api/fleet")).hosts;
  const alive = hosts.filter((h) => h.liveness === "alive").length;
  $("fleet-counts").textContent = hosts.length ? `${alive} of ${hosts.length} alive` : "";
  // an alive host shows its state word; a stale or stopped one says so (its last state in the tooltip); the
  // host's tooltip gives its home and pid (on its own machine), leaving the width to the lineage
  const html = hosts.map((h) => {
    const word = h.liveness === "alive" ? h.state : h.liveness;
    const named = ["leader", "retention"].filter((r) => h[r]);
    if (h.node) named.push(`node ${h.node.node} of #${h.node.job_id}`); // a node of another host's multi-node job
    const roles = named.map((r) => `<span class="role">${esc(r)}</span>`).join(" ");
    return `<tr data-host="${esc(h.name)}" data-liveness="${esc(h.liveness)}"><td class="name" title="${esc(h.home)}, pid ${h.pid}"><bdi>${esc(h.name)}</bdi> ${roles}</td>
      <td><span class="badge" data-state="${esc(word)}" title="last state: ${esc(h.state)}${h.paused ? " (paused)" : ""}">${esc(word)}</span></td>
      <td class="num">${duration(h.heartbeat_age_s)}</td><td class="num">${h.job_id ? "#" + h.job_id : "—"}</td>
      <td class="name lineage">${leaseCell(h.lineage)}</td><td class="num">${esc(h.version)}</td></tr>`;
  }).join("");
  rows($("fleet-table").tBodies[0], html, 6, "no daemon has joined yet");
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
      <span class="msg"><bdi>${esc(e.message)}</bdi></span>`;
    list.prepend(li);
  }
  while (list.children.length > 200) list.lastChild.remove();
}

async function refreshEvents() {
  const events = (await api("/api/events?limit=100")).items;
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
  await Promise.allSettled([refreshLists(), refreshSystem(), refreshFleet(), refreshEvents()]);
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
setInterval(() => { refreshSystem().catch(() => {}); refreshFleet().catch(() => {}); }, 5000);

drawCharts();
connect();
$("models-lineage").addEventListener("change", showModels);
