// Corral dashboard: polls corral/status once a second and redraws. No dependencies.
// Everything taken from the status answer is inserted as text, never as HTML: client
// names, paths and error messages come from requests.
"use strict";

const POLL_MS = 1000;
const SPAN_S = 300;       // the charts show at most the last five minutes ...
const MIN_SPAN_S = 60;    // ... and at least one, so a young gateway's data is not a sliver
const PALETTE = ["#4f46e5", "#0d9488", "#d97706", "#e11d48", "#0284c7", "#7c3aed",
                 "#65a30d", "#db2777", "#475569", "#ca8a04"];
const CLASS_COLORS = { high: "#e11d48", normal: "#4f46e5", low: "#0d9488" };

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "style") Object.assign(node.style, v);
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function fmt(n, digits) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return n.toFixed(digits === undefined ? 0 : digits);
}

function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms >= 10000) return (ms / 1000).toFixed(0) + " s";
  if (ms >= 1000) return (ms / 1000).toFixed(1) + " s";
  return ms.toFixed(ms < 10 ? 1 : 0) + " ms";
}

function fmtUptime(s) {
  if (s < 120) return Math.round(s) + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

function mean(values) {
  const v = values.filter((x) => x !== null && x !== undefined);
  return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null;
}

// A colour per name that stays the same from one poll to the next.
const colorOf = (() => {
  const assigned = new Map();
  return (name) => {
    if (!assigned.has(name)) assigned.set(name, PALETTE[assigned.size % PALETTE.length]);
    return assigned.get(name);
  };
})();

// -- charts ---------------------------------------------------------------------------

// A round grid step giving at most four steps up to max (at least 1 for counts).
function niceStep(max, integer) {
  const raw = max > 0 ? max / 4 : 0.25;
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  let step = 10 * p;
  for (const m of [1, 2, 2.5, 5]) if (raw <= m * p) { step = m * p; break; }
  return integer ? Math.max(1, Math.ceil(step)) : step;
}

function fmtAgo(s) {
  if (s === 0) return "now";
  return s % 60 === 0 ? `-${s / 60}m` : `-${s}s`;
}

// lines: [{name, color, values}], values aligned with t (epoch seconds); null = no data.
// integer: the values are counts, so the grid never shows fractions.
function drawChart(canvas, t, lines, integer) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const left = 44, right = 8, top = 8, bottom = 20;
  const pw = w - left - right, ph = h - top - bottom;
  const now = t.length ? t[t.length - 1] : Date.now() / 1000;
  const span = Math.min(SPAN_S, Math.max(MIN_SPAN_S, t.length ? now - t[0] : 0));
  const x0 = now - span;
  let max = 0;
  for (const line of lines) for (const v of line.values) if (v !== null && v > max) max = v;
  const step = niceStep(max, integer);
  const ymax = Math.max(step, Math.ceil(max / step - 1e-9) * step);
  const xOf = (ts) => left + ((ts - x0) / span) * pw;
  const yOf = (v) => top + ph - (v / ymax) * ph;

  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  ctx.strokeStyle = "#eceef2";
  ctx.fillStyle = "#6b7280";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  const digits = step >= 1 ? 0 : step >= 0.1 ? 1 : 2;
  for (let v = 0; v <= ymax + step / 2; v += step) {
    const y = Math.round(yOf(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + pw, y); ctx.stroke();
    ctx.fillText(fmt(v, digits), left - 6, y);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const tick = span > 120 ? 60 : 15;
  for (let ago = Math.floor(span / tick) * tick; ago >= 0; ago -= tick) {
    const x = xOf(now - ago);
    ctx.fillText(fmtAgo(ago), Math.min(Math.max(x, left + 10), left + pw - 12), top + ph + 5);
  }

  for (const line of lines) {
    ctx.strokeStyle = line.color;
    ctx.lineWidth = 1.75;
    ctx.lineJoin = "round";
    ctx.beginPath();
    let drawing = false, first = null, last = null, gaps = false;
    for (let i = 0; i < t.length; i++) {
      const v = line.values[i];
      if (t[i] < x0) continue;
      if (v === null || v === undefined) { drawing = false; gaps = true; continue; }
      const x = xOf(t[i]), y = yOf(v);
      if (drawing) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      drawing = true;
      if (first === null) first = x;
      last = x;
    }
    ctx.stroke();
    // A value between two gaps (e.g. the only request of a quiet minute) is a dot.
    ctx.fillStyle = line.color;
    for (let i = 0; i < t.length; i++) {
      const v = line.values[i];
      const gap = (j) => j < 0 || j >= t.length || line.values[j] === null ||
                         line.values[j] === undefined;
      if (v === null || v === undefined || t[i] < x0 || !(gap(i - 1) && gap(i + 1))) continue;
      ctx.beginPath(); ctx.arc(xOf(t[i]), yOf(v), 2.5, 0, 2 * Math.PI); ctx.fill();
    }
    if (lines.length === 1 && first !== null && !gaps) {
      // A single unbroken series gets a light fill under it.
      ctx.lineTo(last, top + ph); ctx.lineTo(first, top + ph); ctx.closePath();
      ctx.globalAlpha = 0.08; ctx.fillStyle = line.color; ctx.fill(); ctx.globalAlpha = 1;
    }
  }
}

function legend(target, lines) {
  target.replaceChildren(...lines.map((l) =>
    el("span", {}, el("i", { style: { background: l.color } }), l.name)));
}

// -- sections ---------------------------------------------------------------------------

function backendState(b) {
  if (!b.up) return ["down", "down"];
  if (b.draining) return ["out", "draining"];
  if (!b.routable) return ["out", b.breaker === "open" ? "breaker open" : "out"];
  return ["up", "up"];
}

function renderBackends(backends) {
  const cards = backends.map((b) => {
    const [cls, label] = backendState(b);
    let slots;
    if (b.slots <= 16) {
      const blocks = [];
      for (let i = 0; i < b.slots; i++) blocks.push(el("div", { class: "slot" + (i < b.in_flight ? " busy" : "") }));
      slots = el("div", { class: "slot-bar" }, ...blocks);
    } else {
      const pct = Math.min(100, (100 * b.in_flight) / b.slots);
      slots = el("div", { class: "meter" }, el("div", { style: { width: pct + "%" } }));
    }
    // What the backend holds (resident or loading, with running requests and the load
    // time there), then the models only installed.
    const holds = b.holds || b.loaded.map((m) => ({ model: m, state: "ready", running: 0 }));
    const held = new Set(holds.map((h) => h.model));
    const chips = holds.map((h) => el("span", {
      class: "chip loaded" + (h.state === "loading" ? " loading" : ""),
      title: `${h.state}` + (h.context_length ? ` · context ${h.context_length}` : "")
        + (h.load_time_s !== undefined ? ` · load ${h.load_time_s} s`
          + (h.load_time_learned ? " (measured)" : " (default)") : ""),
    }, h.model + (h.state === "loading" ? " ⟳" : h.running ? ` ×${h.running}` : "")));
    for (const m of b.models) {
      if (!held.has(m)) chips.push(el("span", { class: "chip", title: "installed" }, m));
    }
    return el("div", { class: "backend " + cls, "data-backend": b.name },
      el("div", { class: "backend-head" },
        el("div", {}, el("div", { class: "backend-name" }, b.name),
                      el("div", { class: "backend-url" }, b.url)),
        el("span", { class: "pill " + cls }, label)),
      el("div", { class: "slots" }, el("span", {}, `slots ${b.in_flight}/${b.slots}`), slots),
      el("div", { class: "models" }, ...(chips.length ? chips : [el("span", { class: "empty" }, "no models")])),
      el("div", { class: "backend-stats" },
        el("span", {}, "TTFB p50 ", el("b", {}, fmtMs(b.ttfb_p50_ms_1m))),
        el("span", {}, "requests · 1 min ", el("b", {}, fmt(b.requests_1m))),
        b.probe_latency_ms !== null && b.probe_latency_ms !== undefined
          ? el("span", {}, "probe ", el("b", {}, fmtMs(b.probe_latency_ms))) : null,
        b.max_models ? el("span", {}, "holds ", el("b", {}, `${holds.length}/${b.max_models}`)) : null,
        b.rent_s ? el("span", { title: "idle slot-time lost while work it could load waited" },
                      "rent ", el("b", {}, fmt(b.rent_s, 1) + " s")) : null),
      b.last_error ? el("div", { class: "backend-error" }, b.last_error) : null);
  });
  $("backends").replaceChildren(...cards);
}

function renderCharts(status) {
  const s = status.series;
  const t = s.t;
  const rps = [{ name: "completed", color: PALETTE[0], values: s.requests_per_s },
               { name: "rejected", color: "#dc2626", values: s.rejected_per_s }];
  legend($("legend-rps"), rps);
  drawChart($("chart-rps"), t, rps);

  const tps = [{ name: "out", color: PALETTE[0], values: s.tokens_out_per_s },
               { name: "in", color: PALETTE[1], values: s.tokens_in_per_s }];
  legend($("legend-tps"), tps);
  drawChart($("chart-tps"), t, tps);

  const ttfb = [{ name: "p50", color: PALETTE[2], values: s.ttfb_p50_ms }];
  drawChart($("chart-ttfb"), t, ttfb);

  const queue = Object.keys(CLASS_COLORS).map((c) => ({
    name: c, color: CLASS_COLORS[c], values: s.queue.map((q) => (q ? q[c] ?? 0 : null)),
  }));
  legend($("legend-queue"), queue);
  drawChart($("chart-queue"), t, queue, true);

  const inflight = status.backends.map((b) => ({
    name: b.name, color: colorOf(b.name), values: s.in_flight.map((f) => (f ? f[b.name] ?? 0 : null)),
  }));
  legend($("legend-inflight"), inflight);
  drawChart($("chart-inflight"), t, inflight, true);
}

function renderClients(clients) {
  const rows = clients.map((c) => el("tr", {},
    el("td", {}, c.name),
    el("td", { class: "num" }, fmt(c.share * 100, 1) + " %"),
    el("td", { class: "num" }, fmt(c.tokens)),
    el("td", { class: "num" }, fmt(c.requests)),
    el("td", { class: "num" }, fmt(c.counter))));
  $("clients").replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: "5", class: "empty" }, "no client served in the last minute"))]));

  const served = clients.filter((c) => c.tokens > 0 || c.requests > 0).slice(0, 8);
  const bars = served.map((c) => el("div", { class: "share-row" },
    el("span", { class: "share-name", title: c.name }, c.name),
    el("div", { class: "meter" }, el("div", { style: { width: (c.share * 100).toFixed(1) + "%", background: colorOf("client:" + c.name) } })),
    el("span", { class: "share-pct" }, fmt(c.share * 100, 0) + " %")));
  $("shares").replaceChildren(...(bars.length ? bars
    : [el("div", { class: "empty" }, "no traffic in the last minute")]));
}

function renderModels(models, sched) {
  const rows = (models || []).map((m) => el("tr", {},
    el("td", {}, m.model),
    el("td", { class: "num" }, fmt(m.demand_per_s, 2)),
    el("td", { class: "num" }, fmt(m.queued)),
    el("td", { class: "num" }, fmt(m.running)),
    el("td", { class: "num" }, m.service_s === null ? "–" : fmt(m.service_s, 2) + " s"),
    el("td", {}, (m.resident_on || []).join(", ") || "–")));
  $("models").replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: "6", class: "empty" }, "no model asked for yet"))]));
  $("sched-note").textContent = sched
    ? `· ${fmt(sched.loads)} loads · ${fmt(sched.preemptions)} preemptions` : "";
}

function renderReplicas(shared) {
  // Several replicas on one state store: who they are, who orders the queue.
  const panel = $("replicas-panel");
  if (!shared) { panel.hidden = true; return; }
  panel.hidden = false;
  const now = Date.now() / 1000;
  const rows = (shared.replicas || []).map((r) => el("tr", {},
    el("td", {}, r.id + (r.id === shared.replica ? " (this one)" : "")),
    el("td", {}, r.address || "–"),
    el("td", {}, r.version || "–"),
    el("td", { class: (shared.config_mismatch || []).includes(r.id) ? "status-503" : "" },
       r.config || "–"),
    el("td", {}, r.id === shared.leader ? "leader" : "replica"),
    el("td", { class: "num" }, r.seen ? `${Math.max(0, now - r.seen).toFixed(1)} s ago` : "–")));
  $("replicas").replaceChildren(...rows);
  $("replicas-note").textContent = `· ${fmt(shared.waiting)} waiting on all replicas · store `
    + (shared.store === "ok" ? "ok" : "unavailable" + (shared.alone ? " (carrying on alone)" : ""));
}

function renderRejections(rejections) {
  const rows = rejections.slice(0, 50).map((r) => el("tr", {},
    el("td", {}, r.time ? new Date(r.time * 1000).toLocaleTimeString() : "–"),
    el("td", {}, r.client),
    el("td", { class: "status-" + r.status }, r.status),
    el("td", {}, r.rule || r.error || r.limit || ""),
    el("td", {}, r.path || "")));
  $("rejections").replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: "5", class: "empty" }, "none"))]));
}

function renderHeader(status) {
  const s = status.series;
  const slots = status.backends.reduce((a, b) => a + (b.routable ? b.slots : 0), 0);
  const busy = status.backends.reduce((a, b) => a + b.in_flight, 0);
  $("version").textContent = `v${status.version} · up ${fmtUptime(status.uptime_s)}`;
  // Rates over the last five samples: a single second is too jumpy to read.
  $("kpi-rps").textContent = fmt(mean(s.requests_per_s.slice(-5)), 1);
  $("kpi-tps").textContent = fmt(mean(s.tokens_out_per_s.slice(-5)), 0);
  $("kpi-ttfb").textContent = fmtMs(status.recent ? status.recent.ttfb_p50_ms : null);
  $("kpi-slots").textContent = `${busy}/${slots}`;
  $("kpi-queue").textContent = fmt(status.queue.depth);
  $("kpi-requests-total").textContent = fmt(status.totals.requests);
}

function render(status) {
  renderHeader(status);
  renderBackends(status.backends);
  renderCharts(status);
  renderClients(status.clients);
  renderModels(status.models, status.scheduler);
  renderReplicas(status.shared);
  renderRejections(status.rejections);
}

function setConnection(ok, text) {
  $("conn-dot").className = "dot " + (ok ? "live" : "offline");
  $("conn-text").textContent = text;
}

let last = null;

async function poll() {
  try {
    const resp = await fetch("corral/status", { cache: "no-store" });
    if (!resp.ok) throw new Error(`status ${resp.status}`);
    last = await resp.json();
    render(last);
    setConnection(true, "live");
  } catch (err) {
    // Gateway restarting or unreachable: keep the last picture, say so, retry.
    setConnection(false, "offline — retrying");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

// The usage ledger: top clients today and over the last seven days (UTC), read
// again when requests have been served since (looked at every 5 s), and at least
// every minute. A key given as #key=… in the address is sent with it (the fragment
// never leaves the browser); without one, the gateway decides what to show.
const USAGE_CHECK_MS = 5000;
const USAGE_MAX_MS = 60000;
const USAGE_TOP = 10;
let usageTotal = null;
let usageAt = 0;

function usageHeaders() {
  const key = new URLSearchParams(location.hash.slice(1)).get("key");
  return key ? { Authorization: "Bearer " + key } : {};
}

function renderUsage(week, today) {
  const todayBy = new Map(today.rows.map((r) => [r.client, r]));
  const rows = week.rows.slice(0, USAGE_TOP).map((r) => {
    const t = todayBy.get(r.client);
    return el("tr", { "data-client": r.client },
      el("td", {}, r.client),
      el("td", { class: "num" }, fmt(t ? t.requests : 0)),
      el("td", { class: "num" }, fmt(t ? t.tokens_in + t.tokens_out : 0)),
      el("td", { class: "num" }, fmt(r.requests)),
      el("td", { class: "num" }, fmt(r.tokens_in + r.tokens_out)),
      el("td", { class: "num" }, fmt(r.refused)),
      el("td", { class: "num" }, fmt(r.errors)));
  });
  $("usage").replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: "7", class: "empty" }, "no usage recorded this week"))]));
  const more = week.rows.length > USAGE_TOP ? ` · top ${USAGE_TOP} of ${week.rows.length}` : "";
  $("usage-note").textContent = `· ${week.from} to ${week.to} UTC, by tokens${more}`;
}

async function pollUsage() {
  const total = last ? last.totals.requests : null;
  if (total === usageTotal && Date.now() - usageAt < USAGE_MAX_MS) {
    setTimeout(pollUsage, USAGE_CHECK_MS);
    return;
  }
  usageTotal = total;
  usageAt = Date.now();
  try {
    const get = (q) => fetch("corral/usage?by=client" + q, { cache: "no-store", headers: usageHeaders() });
    const [week, today] = await Promise.all([get(""), get("&from=" + new Date().toISOString().slice(0, 10))]);
    if (week.ok && today.ok) {
      renderUsage(await week.json(), await today.json());
    } else {
      const answer = await week.json().catch(() => ({}));
      $("usage").replaceChildren(el("tr", {}, el("td", { colspan: "7", class: "empty" },
        (answer.error || `usage: status ${week.status}`) + (week.status === 401 ? " — open the dashboard as …/dashboard#key=YOUR-ADMIN-KEY" : ""))));
    }
  } catch (err) {
    // Offline: the status poll already says so.
  } finally {
    setTimeout(pollUsage, USAGE_CHECK_MS);
  }
}

window.addEventListener("resize", () => { if (last) renderCharts(last); });
poll();
pollUsage();
