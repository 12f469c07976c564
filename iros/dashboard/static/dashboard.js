// The Iros dashboard: draws the panels /api/monitoring/dashboard/layout lists, each widget from its own
// API, and keeps live values current over /ws/metrics. Every widget ends in one data-state:
// "ok" (shows data), "empty" (the API answered with nothing yet), "unavailable" (404) or "error".
"use strict";

const LIVE_SCALE = { cache_hit_rate: 100, error_rate: 100 }; // live ratios shown as percentages
const RANGE_SECONDS = { "1h": 3600, "1d": 86400, "24h": 86400, "1w": 604800, "7d": 604800, "1m": 2592000 };
const COLORS = ["#2f5fb3", "#b35900", "#c62828", "#1a7f37", "#6a3fb3"];
const state = { layout: null, range: null, widgets: [], cards: [], liveStats: [], cpuChart: null, ticks: 0 };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function fmt(value, format) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  const digits = Math.abs(value) >= 100 ? 0 : Math.abs(value) >= 10 ? 1 : Math.abs(value) >= 1 ? 2 : 3;
  const text = value.toLocaleString("en-US", { maximumFractionDigits: digits });
  if (format === "milliseconds") return `${text} ms`;
  if (format === "percentage") return `${text} %`;
  return text;
}

function label(key) {
  return String(key).replace(/_/g, " ");
}

async function api(url, options = {}) {
  const response = await fetch(url, {
    credentials: "same-origin",
    headers: { accept: "application/json", ...(options.body ? { "content-type": "application/json" } : {}) },
    ...options,
  });
  if (response.status === 401) {
    window.location.assign("/dashboard/login");
    throw new Error("signed out");
  }
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  return { status: response.status, ok: response.ok, body };
}

function setState(widget, st, message) {
  widget.node.dataset.state = st;
  if (message !== undefined) widget.body.replaceChildren(el("p", { class: "note", text: message }));
}

function makeWidget(parent, spec, extraClass) {
  const body = el("div", { class: "body" });
  const node = el("section", {
    class: `widget ${extraClass || ""}`.trim(), "data-widget": spec.type, "data-state": "loading",
    "data-title": spec.title,
  }, el("h3", { text: spec.title }), body);
  parent.append(node);
  const widget = { spec, node, body };
  setState(widget, "loading", "loading…");
  return widget;
}

// --- charts -----------------------------------------------------------------------------------------
const PLOT_CONFIG = { responsive: true, displaylogo: false, displayModeBar: false };
// The grid reflows while widgets arrive; a chart follows its box, not only the window.
const resizer = new ResizeObserver((entries) => {
  for (const entry of entries) {
    if (entry.target.data && entry.target.isConnected && entry.contentRect.width > 0) {
      window.Plotly.Plots.resize(entry.target);
    }
  }
});

function plot(div, traces, layout) {
  window.Plotly.newPlot(div, traces, layout, PLOT_CONFIG);
  resizer.observe(div);
}

function plotLayout(extra = {}) {
  return {
    margin: { l: 48, r: 12, t: 8, b: 36 }, paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
    font: { size: 11 }, legend: { orientation: "h", x: 0, y: 1.12 }, xaxis: { automargin: true },
    yaxis: { automargin: true, rangemode: "tozero" }, ...extra,
  };
}

function drawSeries(widget, chart) {
  const series = chart.series || {};
  const traces = Object.entries(series).map(([name, points], i) => ({
    // Markers too: a few points over a week are otherwise invisible.
    type: "scatter", mode: "lines+markers", marker: { size: 4 }, name: label(name),
    x: points.map((p) => localTime(new Date(p[0]))), y: points.map((p) => p[1]), connectgaps: false,
    line: { color: COLORS[i % COLORS.length], width: 2 },
  }));
  const has = traces.some((t) => t.y.some((v) => v !== null));
  if (!has) return setState(widget, "empty", `no data in the last ${chart.time_range || "range"}`);
  const target = chart.target ?? null;
  const shapes = target === null ? [] : [{
    type: "line", xref: "paper", x0: 0, x1: 1, y0: target, y1: target, line: { dash: "dot", color: "#1a7f37" },
  }];
  const div = el("div", { class: "chart" });
  widget.body.replaceChildren(div);
  if (chart.unit || chart.step_seconds) {
    widget.body.append(el("p", {
      class: "note",
      text: `${chart.unit ? `unit: ${chart.unit} · ` : ""}${chart.time_range || ""}, ${chart.step_seconds} s steps`,
    }));
  }
  // The whole range on the x axis, so one point is a point in time, not a zoom into milliseconds.
  const span = RANGE_SECONDS[chart.time_range] || 3600;
  const now = Date.now();
  const xaxis = { type: "date", automargin: true, range: [new Date(now - span * 1000), new Date(now)].map(localTime) };
  plot(div, traces, plotLayout({ shapes, xaxis, margin: { l: 48, r: 12, t: 28, b: 36 } }));
  setState(widget, "ok");
  return div;
}

// Plotly reads zone-less date strings as they are; the API's are UTC, shown here in local time.
function localTime(date) {
  const d = new Date(date.getTime() - date.getTimezoneOffset() * 60000);
  return d.toISOString().slice(0, 23);
}

function drawHistogram(widget, chart) {
  const counts = chart.counts || [];
  if (!counts.some((c) => c > 0)) return setState(widget, "empty", `no responses in the last ${chart.time_range}`);
  const div = el("div", { class: "chart" });
  widget.body.replaceChildren(div, el("p", { class: "note", text: `buckets (ms): ${chart.buckets.join(", ")}` }));
  plot(div, [{ type: "bar", x: chart.labels, y: counts, marker: { color: COLORS[0] } }],
    plotLayout({ xaxis: { type: "category", automargin: true } }));
  setState(widget, "ok");
}

function drawGauge(widget, chart) {
  if (!chart.available) {
    widget.body.replaceChildren(el("div", { class: "no-gpu", "data-gpu": "none", text: chart.label || "no GPU" }));
    return setState(widget, "ok");
  }
  const div = el("div", { class: "chart gauge" });
  widget.body.replaceChildren(div);
  plot(div, [{
    type: "indicator", mode: "gauge+number", value: chart.value, number: { suffix: " %" },
    gauge: { axis: { range: [0, chart.max_value || 100] }, bar: { color: COLORS[0] } },
  }], plotLayout({ margin: { l: 24, r: 24, t: 16, b: 8 } }));
  setState(widget, "ok");
}

// --- cards --------------------------------------------------------------------------------------------
function levelOf(value, target, warning, critical) {
  if (value === null || value === undefined || warning === null || critical === null) return "no_data";
  const higherIsWorse = critical >= (target ?? warning);
  if (higherIsWorse) return value >= critical ? "critical" : value >= warning ? "warning" : "ok";
  return value <= critical ? "critical" : value <= warning ? "warning" : "ok";
}

function drawCard(widget, w) {
  const value = el("div", { class: "card-value", "data-metric": w.metric });
  const target = el("div", { class: "note" });
  widget.body.replaceChildren(value, target);
  widget.update = (v) => {
    value.textContent = fmt(v, w.format);
    const level = levelOf(v, w.target, w.warning_threshold, w.critical_threshold);
    widget.node.dataset.level = level;
    target.textContent = `target ${fmt(w.target, w.format)} · warning ${fmt(w.warning_threshold, w.format)}`
      + ` · critical ${fmt(w.critical_threshold, w.format)}` + (level === "no_data" ? " · no traffic yet" : "");
    setState(widget, v === null || v === undefined ? "empty" : "ok");
  };
  widget.metric = w.metric;
  widget.update(w.value);
  state.cards.push(widget);
}

function drawStatus(widget, w) {
  const dot = el("span", { class: "dot", "data-level": w.value });
  const text = el("span", { text: label(w.value) });
  const detail = el("div", { class: "note" });
  widget.body.replaceChildren(el("div", { class: "status" }, dot, text), detail);
  widget.updateStatus = (status, kpis) => {
    dot.dataset.level = status;
    text.textContent = label(status);
    const worst = Object.entries(kpis || {}).filter(([, k]) => k && k.level && k.level !== "ok"
      && k.level !== "no_data").map(([name, k]) => `${label(name)}: ${k.level}`);
    detail.textContent = worst.length ? worst.join(" · ") : "every KPI within target";
    document.getElementById("health").dataset.level = status;
    document.getElementById("health").textContent = `health: ${label(status)}`;
  };
  widget.updateStatus(w.value, w.kpis);
  state.status = widget;
  setState(widget, "ok");
}

function drawLive(widget, spec) {
  const cells = {};
  const grid = el("div", { class: "stats" });
  for (const m of spec.metrics) {
    cells[m.metric] = el("b", { "data-live-metric": m.metric, text: "–" });
    grid.append(el("div", { class: "stat" }, cells[m.metric], el("span", { text: m.title })));
  }
  widget.body.replaceChildren(grid, el("p", { class: "note", text: "over the last 60 s, from /ws/metrics" }));
  widget.live = (metrics) => {
    for (const m of spec.metrics) {
      const raw = metrics[m.metric];
      const v = typeof raw === "number" && LIVE_SCALE[m.metric] ? raw * LIVE_SCALE[m.metric] : raw;
      cells[m.metric].textContent = fmt(v, m.format);
    }
    setState(widget, "ok");
  };
  state.liveStats.push(widget);
}

// --- lists from other APIs ----------------------------------------------------------------------------
function firstList(data) {
  if (Array.isArray(data)) return data;
  if (!data || typeof data !== "object") return [];
  for (const v of Object.values(data)) if (Array.isArray(v) && v.length && typeof v[0] === "object") return v;
  for (const v of Object.values(data)) if (Array.isArray(v)) return v;
  const nested = Object.entries(data).filter(([, v]) => v && typeof v === "object" && !Array.isArray(v));
  if (nested.length && nested.every(([, v]) => Object.values(v).some((x) => typeof x !== "object"))) {
    return nested.map(([name, v]) => ({ name, ...v }));
  }
  return [];
}

function cellText(v, key = "") {
  if (v === null || v === undefined) return "–";
  if (key.endsWith("_at") && (typeof v === "number" || typeof v === "string")) {
    const d = new Date(typeof v === "number" ? v * 1000 : v);
    if (!Number.isNaN(d.getTime())) return d.toLocaleString("en-GB", { dateStyle: "short", timeStyle: "medium" });
  }
  if (Array.isArray(v) && v.every((x) => typeof x !== "object")) return v.join(", ");
  if (typeof v === "number") return fmt(v);
  if (typeof v === "object") return JSON.stringify(v).slice(0, 80);
  return String(v);
}

function table(rows, columns, extra) {
  const head = el("tr", {}, ...columns.map((c) => el("th", { text: label(c) })), extra ? el("th", { text: "" }) : null);
  const body = rows.map((r) => el("tr", { "data-id": r.id ?? r.alert_id ?? null },
    ...columns.map((c) => el("td", {
      class: typeof r[c] === "number" && !c.endsWith("_at") ? "num" : null, "data-col": label(c), text: cellText(r[c], c),
    })),
    extra ? el("td", {}, ...extra(r)) : null));
  return el("div", { class: "table-wrap" }, el("table", {}, el("thead", {}, head), el("tbody", {}, ...body)));
}

// Nested objects one level down become "parent child" columns: {"response_time_ms": {"p50": 1}}.
function flatRow(row) {
  const out = {};
  for (const [k, v] of Object.entries(row)) {
    if (v && typeof v === "object" && !Array.isArray(v)) {
      for (const [k2, v2] of Object.entries(v)) if (v2 === null || typeof v2 !== "object") out[`${k} ${k2}`] = v2;
    } else out[k] = v;
  }
  return out;
}

function columnsOf(rows, prefer, max = 7) {
  const seen = [];
  const scalar = (v) => v === null || typeof v !== "object" || (Array.isArray(v) && v.every((x) => typeof x !== "object"));
  for (const r of rows.slice(0, 20)) {
    for (const [k, v] of Object.entries(r)) if (!seen.includes(k) && scalar(v)) seen.push(k);
  }
  const first = prefer.filter((k) => seen.includes(k));
  return [...first, ...seen.filter((k) => !first.includes(k))].slice(0, max);
}

function drawAlerts(widget, data) {
  const alerts = firstList(data);
  if (!alerts.length) return setState(widget, "empty", "no active alerts");
  const actions = widget.spec.actions;
  const buttons = (a) => {
    const id = a.id ?? a.alert_id;
    if (id === undefined) return [];
    const post = async (kind, body) => {
      const r = await api(actions[kind].replace("{alert_id}", encodeURIComponent(id)), {
        method: "POST", body: JSON.stringify(body),
      });
      widget.node.dataset.lastAction = `${kind}:${r.status}`;
      await loadWidget(widget);
    };
    return [
      el("button", {
        type: "button", "data-action": "acknowledge", disabled: a.acknowledged ? "" : null,
        onclick: () => post("acknowledge", {}),
      }, a.acknowledged ? "Acknowledged" : "Acknowledge"),
      " ",
      el("button", {
        type: "button", "data-action": "silence", disabled: a.silenced ? "" : null,
        onclick: () => post("silence", { duration_minutes: 60 }),
      }, a.silenced ? "Silenced" : "Silence 1 h"),
    ];
  };
  const rows = alerts.map((a) => ({ ...a, summary: a.annotations?.summary ?? a.summary ?? a.message }));
  const cols = columnsOf(rows, ["severity", "rule", "name", "state", "value", "summary", "fired_at", "acknowledged", "silenced"], 9)
    .filter((c) => c !== "id" && c !== "fingerprint");
  widget.body.replaceChildren(table(rows, cols, buttons));
  widget.body.querySelectorAll("td").forEach((td) => {
    if (td.textContent === "critical" || td.textContent === "warning") td.className = `sev-${td.textContent}`;
  });
  setState(widget, "ok");
}

const EFFECT_KPIS = ["response_time_avg", "response_time_p95", "cache_hit_rate", "cpu_usage_avg", "error_rate", "throughput_rps"];

// What an action changed (settings before → after) and the KPIs in the windows before and after it.
function effect(row) {
  const changes = Object.entries(row.changes || {}).map(([k, c]) => `${k}: ${cellText(c.before)} → ${cellText(c.after)}`);
  const before = row.kpis_before || row.before || {};
  const after = row.kpis_after || row.after || {};
  const kpis = EFFECT_KPIS.filter((k) => typeof before[k] === "number" || typeof after[k] === "number")
    .map((k) => `${label(k)} ${fmt(before[k])} → ${fmt(after[k])}`);
  return { change: changes.join("; ") || null, effect: kpis.join(" · ") || row.note || null };
}

function drawActions(widget, data, rules) {
  const rows = firstList(data).map((r) => ({ ...r, ...effect(r) }));
  const ruleRows = firstList(rules);
  if (!rows.length && !ruleRows.length) return setState(widget, "empty", "no optimization actions yet");
  const parts = [];
  if (rows.length) parts.push(table(rows.slice(0, 50), columnsOf(rows, ["rule", "actions", "applied_at", "active", "change", "effect"], 6)));
  else parts.push(el("p", { class: "note", text: "no actions applied yet" }));
  if (ruleRows.length) {
    parts.push(el("p", { class: "note", text: `${ruleRows.length} optimization rule(s) configured` }));
    parts.push(table(ruleRows, columnsOf(ruleRows, ["name", "trigger", "actions", "state", "value", "fired_at"], 6)));
  }
  widget.body.replaceChildren(...parts);
  setState(widget, "ok");
}

const TEXT_KEYS = ["recommendation", "recommendations", "findings", "suggestions"];

// Sentences under recommendation/findings keys, at any depth (capacity and bottleneck analyses).
function texts(data, depth = 0, out = []) {
  if (!data || typeof data !== "object" || depth > 3) return out;
  for (const [k, v] of Object.entries(data)) {
    if (TEXT_KEYS.includes(k)) {
      if (typeof v === "string") out.push(v);
      else if (Array.isArray(v)) {
        for (const item of v) {
          if (typeof item === "string") out.push(item);
          else if (item && typeof item === "object") out.push(item.recommendation || item.message || item.description || JSON.stringify(item));
        }
      }
    }
    if (v && typeof v === "object" && !Array.isArray(v)) texts(v, depth + 1, out);
  }
  return out;
}

function drawRecommendations(widget, results) {
  const items = [...new Set(results.flatMap((data) => texts(data)))];
  if (!items.length) return setState(widget, "empty", "no recommendations: nothing to change");
  widget.body.replaceChildren(el("ul", { class: "recs" }, ...items.slice(0, 30).map((text) => el("li", { text }))));
  setState(widget, "ok");
}

function drawTable(widget, data, prefer) {
  const models = data && data.models && typeof data.models === "object" && !Array.isArray(data.models)
    ? Object.entries(data.models).map(([model, v]) => ({ model, ...v })) : firstList(data);
  const rows = models.map(flatRow);
  if (!rows.length) return setState(widget, "empty", "nothing to compare yet");
  widget.body.replaceChildren(table(rows, columnsOf(rows, prefer)));
  for (const text of texts(data).slice(0, 4)) widget.body.append(el("p", { class: "note", text }));
  setState(widget, "ok");
}

function drawKeyValues(widget, data) {
  const pairs = Object.entries(data || {}).filter(([, v]) => v === null || typeof v !== "object");
  if (!pairs.length) return setState(widget, "empty", "no cache statistics yet");
  widget.body.replaceChildren(el("dl", { class: "kv" }, ...pairs.flatMap(([k, v]) => [
    el("dt", { text: label(k) }), el("dd", { "data-key": k, text: k.endsWith("rate") && typeof v === "number" ? fmt(v * 100, "percentage") : cellText(v) }),
  ])));
  setState(widget, "ok");
}

// The semantic cache's own error: the verified false-hit rate with its interval, against δ, and the cut
// each namespace and model was calibrated to.
function drawCacheEfficiency(widget, data) {
  drawKeyValues(widget, data);
  const v = data && data.verification;
  if (!v) return;
  const pct = (x) => fmt(x * 100, "percentage");
  const rate = v.false_hit_rate === null || v.false_hit_rate === undefined ? "–"
    : `${pct(v.false_hit_rate)} (${pct(v.interval[0])} – ${pct(v.interval[1])})`;
  const rows = [
    ["false-hit rate (95% interval)", rate, "false_hit_rate"],
    ["bound δ (max_false_hit_rate)", pct(v.max_false_hit_rate), "max_false_hit_rate"],
    ["verified", fmt(v.verified), "verified"],
    ["verification calls", fmt(v.verification_calls), "verification_calls"],
    ["verification tokens", fmt(v.verification_tokens), "verification_tokens"],
    ["prior cut", fmt(v.prior_cut), "prior_cut"],
  ];
  const section = el("div", { class: "verification", "data-key": "verification", "data-above-bound": String(Boolean(v.above_bound)) },
    el("h3", { text: v.above_bound ? "Verification: above the bound" : "Verification" }),
    el("dl", { class: "kv" }, ...rows.flatMap(([k, text, key]) => [el("dt", { text: k }), el("dd", { "data-key": key, text })])));
  if (v.scopes && v.scopes.length) {
    const head = el("tr", {}, ...["namespace", "model", "cut", "calibrated", "verified", "false-hit rate"].map((h) => el("th", { text: h })));
    const body = v.scopes.map((s) => el("tr", { "data-scope": `${s.namespace}/${s.model}${s.guarded ? "/shared-instruction" : ""}` },
      ...[s.namespace, s.guarded ? `${s.model} (shared instruction)` : s.model,
        s.cut === null ? "none served" : fmt(s.cut), s.calibrated ? "yes" : "prior",
        fmt(s.verified), s.false_hit_rate === null ? "–" : pct(s.false_hit_rate)].map((t) => el("td", { text: t }))));
    section.append(el("table", {}, el("thead", {}, head), el("tbody", {}, ...body)));
  }
  widget.body.append(section);
  setState(widget, "ok");
}

function drawCosts(widget, data) {
  const groups = (data && data.groups) || [];
  const budgets = (data && data.budgets) || [];
  if (!groups.length && !budgets.length) return setState(widget, "empty", "no priced answers in the last 30 days");
  const usd = (v) => (typeof v === "number" ? `$${v.toFixed(v < 1 ? 6 : 2)}` : cellText(v));
  const body = [el("p", { class: "note", "data-key": "total", text: `spent ${usd(data.cost_usd)}, saved by the cache ${usd(data.saved_usd)}, ${data.requests} answers since ${String(data.start).slice(0, 10)}` })];
  if (groups.length) {
    body.push(table(groups.map((g) => ({ ...g, cost_usd: usd(g.cost_usd), saved_usd: usd(g.saved_usd) })), [data.group_by, "requests", "cost_usd", "saved_usd"]));
  }
  if (budgets.length) {
    body.push(table(budgets.map((b) => ({ key: b.key, budget: `${usd(b.usd)} a ${b.period}`, spent: usd(b.spent_usd), used: fmt(b.share * 100, "percentage"), resets: String(b.resets_at).slice(0, 16) })), ["key", "budget", "spent", "used", "resets"]));
  }
  widget.body.replaceChildren(...body);
  setState(widget, "ok");
}

// --- loading --------------------------------------------------------------------------------------------
async function loadWidget(widget) {
  const spec = widget.spec;
  try {
    if (spec.type === "recommendation_list") {
      const answers = await Promise.all(spec.sources.map((s) => api(s)));
      if (answers.every((a) => a.status === 404)) return setState(widget, "unavailable", "analysis API not available (404)");
      return drawRecommendations(widget, answers.filter((a) => a.ok).map((a) => a.body));
    }
    const answer = await api(spec.source);
    if (answer.status === 404) return setState(widget, "unavailable", `${spec.source} is not available on this server (404)`);
    if (!answer.ok) return setState(widget, "error", answer.body?.error?.message || `HTTP ${answer.status}`);
    if (spec.type === "alert_list") return drawAlerts(widget, answer.body);
    if (spec.type === "action_list") {
      const rules = spec.rules ? await api(spec.rules) : null;
      return drawActions(widget, answer.body, rules && rules.ok ? rules.body : null);
    }
    if (spec.type === "model_table") return drawTable(widget, answer.body, ["model", "requests", "error_rate", "response_time_ms p50", "response_time_ms p95", "ttft_ms p50", "output_tokens_per_second"]);
    if (spec.type === "cache_efficiency") return drawCacheEfficiency(widget, answer.body);
    if (spec.type === "cost_table") return drawCosts(widget, answer.body);
    return setState(widget, "error", `unknown widget type ${spec.type}`);
  } catch (err) {
    return setState(widget, "error", String(err.message || err));
  }
}

async function loadPanel(panel) {
  const range = panel.ranged ? state.range || panel.default_range : null;
  const url = range ? `${panel.source}?range=${range}` : panel.source;
  const answer = await api(url);
  const holder = panel.holder;
  // Charts about to be replaced stop being watched and free what plotly holds for them.
  for (const div of holder.querySelectorAll(".js-plotly-plot")) {
    resizer.unobserve(div);
    window.Plotly.purge(div);
  }
  if (!answer.ok) {
    holder.replaceChildren(el("section", { class: "widget", "data-widget": "panel", "data-state": answer.status === 404 ? "unavailable" : "error" },
      el("p", { class: "note", text: `${url}: ${answer.body?.error?.message || `HTTP ${answer.status}`}` })));
    return;
  }
  const content = answer.body[panel.id] || {};
  const items = content.widgets || content.charts || [];
  holder.replaceChildren();
  if (panel.id === "system_overview") state.cards = [];
  for (const w of items) {
    const widget = makeWidget(holder, w, "");
    if (w.type === "metric_card") drawCard(widget, w);
    else if (w.type === "status_indicator") drawStatus(widget, w);
    else if (w.type === "time_series") drawSeries(widget, w);
    else if (w.type === "multi_line") state.cpuChart = { div: drawSeries(widget, w), range };
    else if (w.type === "histogram") drawHistogram(widget, w);
    else if (w.type === "gauge") drawGauge(widget, w);
    else setState(widget, "error", `unknown widget type ${w.type}`);
  }
}

function buildRanges(ranges) {
  const nav = document.getElementById("ranges");
  nav.replaceChildren(el("span", { class: "note", text: "range" }));
  for (const r of ranges) {
    nav.append(el("button", {
      type: "button", "data-range": r, "aria-pressed": "false",
      onclick: () => {
        state.range = r;
        nav.querySelectorAll("button").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.range === r)));
        for (const p of state.layout.panels) if (p.ranged) loadPanel(p);
      },
    }, r));
  }
}

// --- live -----------------------------------------------------------------------------------------------
function onLive(message) {
  if (message.type !== "metrics") return;
  const metrics = message.metrics || {};
  for (const card of state.cards) {
    if (!(card.metric in metrics)) continue;
    const raw = metrics[card.metric];
    card.update(typeof raw === "number" && LIVE_SCALE[card.metric] ? raw * LIVE_SCALE[card.metric] : raw);
  }
  if (state.status && message.status) state.status.updateStatus(message.status, message.kpis);
  for (const w of state.liveStats) w.live(metrics);
  const sys = message.system || {};
  const chart = state.cpuChart;
  if (chart && chart.div && (chart.range || "1h") === "1h" && typeof sys.cpu_percent === "number") {
    const at = localTime(new Date(message.timestamp));
    window.Plotly.extendTraces(chart.div, { x: [[at], [at]], y: [[sys.cpu_percent], [sys.memory_percent ?? null]] }, [0, 1], 4000);
  }
  state.ticks += 1;
  if (state.ticks % 5 === 0) for (const w of state.widgets) if (w.spec.type === "alert_list") loadWidget(w);
}

function connectLive(path, attempt = 0) {
  const badge = document.getElementById("live-state");
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}`);
  ws.onopen = () => { badge.dataset.state = "open"; badge.textContent = "live"; attempt = 0; };
  ws.onmessage = (event) => { try { onLive(JSON.parse(event.data)); } catch (err) { badge.textContent = `live: ${err.message}`; } };
  ws.onclose = () => {
    badge.dataset.state = "closed";
    badge.textContent = "live: reconnecting";
    setTimeout(() => connectLive(path, attempt + 1), Math.min(10000, 500 * 2 ** attempt));
  };
}

async function main() {
  const answer = await api("/api/monitoring/dashboard/layout");
  const root = document.getElementById("panels");
  if (!answer.ok) {
    root.replaceChildren(el("p", { class: "note", text: `layout: ${answer.body?.error?.message || answer.status}` }));
    return;
  }
  state.layout = answer.body;
  buildRanges(state.layout.time_ranges);
  const liveSpec = {
    type: "live_stats", title: "Live: last 60 s",
    metrics: [
      { metric: "count", title: "responses" }, { metric: "throughput_rps", title: "requests/s" },
      { metric: "error_rate", title: "error rate", format: "percentage" },
      { metric: "response_time_p95", title: "p95 response", format: "milliseconds" },
      { metric: "ttft_avg_ms", title: "time to first token", format: "milliseconds" },
      { metric: "cache_hit_rate", title: "cache hit rate", format: "percentage" },
    ],
  };
  for (const panel of state.layout.panels) {
    const holder = el("div", { class: panel.id === "system_overview" ? "widgets cards" : "widgets" });
    root.append(el("section", { class: "panel", id: `panel-${panel.id}` }, el("h2", { text: panel.title }), holder));
    panel.holder = holder;
    if (panel.id === "system_overview") {
      const live = el("div", { class: "widgets" });
      root.append(el("section", { class: "panel", id: "panel-live" }, el("h2", { text: "Live" }), live));
      drawLive(makeWidget(live, liveSpec, "wide"), liveSpec);
    }
    if (panel.source) loadPanel(panel);
    for (const spec of panel.widgets || []) {
      const widget = makeWidget(holder, spec, spec.type === "alert_list" || spec.type === "action_list" ? "wide" : "");
      state.widgets.push(widget);
      loadWidget(widget);
    }
  }
  connectLive(state.layout.live.websocket);
  // History and analyses change slowly; live values come over the socket.
  setInterval(() => {
    for (const p of state.layout.panels) if (p.source && p.id !== "system_overview") loadPanel(p);
    for (const w of state.widgets) loadWidget(w);
  }, 60000);
}

document.addEventListener("DOMContentLoaded", main);
