// gradguard dashboard: draws runs from the JSON API (or, in a static report,
// from the JSON embedded in the page).  All user-supplied text (layer names,
// messages, advice) goes into the DOM through textContent, and into Plotly
// labels HTML-escaped: nothing from a run is ever parsed as markup.
"use strict";
(function () {
  const embedded = document.getElementById("gg-data");
  const STATIC = embedded ? JSON.parse(embedded.textContent) : null;
  const COLORS = ["#3a7bd5", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b"];
  const SEV = {critical: "#d62728", warning: "#ff9f1c", info: "#3a7bd5"};
  const state = {runs: [], primary: null, overlay: new Set(), range: null, highlight: [],
                 data: {}, heat: null, layers: [], events: [], sig: "", syncing: false};
  const charts = ["chart-loss", "chart-norm", "chart-clip", "chart-heat"];
  const $ = (id) => document.getElementById(id);

  function esc(s) {  // for Plotly labels, which understand a little HTML
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  // Non-finite numbers arrive as "NaN" / "Inf" / "-Inf" (older servers and reports: null).
  const NONFINITE = {"NaN": NaN, "Inf": Infinity, "-Inf": -Infinity};
  function num(v) {
    if (v === null || v === undefined) return NaN;
    return typeof v === "string" ? (v in NONFINITE ? NONFINITE[v] : NaN) : v;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "string") return v;
    const a = Math.abs(v);
    return (a !== 0 && (a < 1e-3 || a >= 1e4)) ? v.toExponential(2) : v.toPrecision(4);
  }
  function q(run, kind, range, points) {
    let p = "api/runs/" + encodeURIComponent(run) + "/" + kind;
    const args = [];
    if (range) args.push("start=" + Math.floor(range[0]), "end=" + Math.ceil(range[1]));
    if (points) args.push("max_points=" + points);
    return args.length ? p + "?" + args.join("&") : p;
  }
  async function api(path) {
    if (STATIC) {
      if (!(path in STATIC)) throw new Error("not in report: " + path);
      return STATIC[path];
    }
    const r = await fetch(path, {cache: "no-store"});
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return r.json();
  }

  // ------------------------------------------------------------ run picker
  function renderRunPicker() {
    const sel = $("run");
    const names = state.runs.map((r) => r.name);
    if (Array.from(sel.options).map((o) => o.value).join("\n") !== names.join("\n")) {
      sel.replaceChildren(...names.map((n) => { const o = el("option", null, n); o.value = n; return o; }));
    }
    sel.value = state.primary || "";
    const ov = $("overlay");
    ov.replaceChildren(...names.filter((n) => n !== state.primary).map((n) => {
      const lab = el("label");
      const cb = el("input");
      cb.type = "checkbox"; cb.value = n; cb.checked = state.overlay.has(n);
      cb.addEventListener("change", () => {
        if (cb.checked) state.overlay.add(n); else state.overlay.delete(n);
        refresh(true);
      });
      lab.append(cb, " " + n);
      return lab;
    }));
    const info = state.runs.find((r) => r.name === state.primary);
    const st = $("status");
    st.textContent = info ? info.status + " · step " + (info.last_step ?? "–") : "no runs yet";
    st.className = "badge " + (info ? info.status : "");
  }

  // ---------------------------------------------------------------- charts
  function shownRuns() { return [state.primary, ...Array.from(state.overlay)].filter((r) => r && state.data[r]); }
  function runColor(run) { return COLORS[Math.max(0, state.runs.findIndex((r) => r.name === run)) % COLORS.length]; }
  function xaxis() {
    const ax = {title: {text: "step"}, zeroline: false};
    if (state.range) { ax.range = state.range.slice(); ax.autorange = false; } else ax.autorange = true;
    return ax;
  }
  function eventShapes() {
    return state.events.slice(0, 300).map((e) => ({
      type: "line", xref: "x", yref: "paper", x0: e.step, x1: e.step, y0: 0, y1: 1,
      line: {color: SEV[e.severity] || "#888", width: 1, dash: "dot"}, opacity: 0.7}));
  }
  function layout(title, ytitle, ylog, extra) {
    return Object.assign({title: {text: title, font: {size: 14}, x: 0.01}, margin: {l: 60, r: 20, t: 30, b: 36},
      xaxis: xaxis(), yaxis: {title: {text: ytitle}, type: ylog ? "log" : "linear", exponentformat: "power"},
      showlegend: true, legend: {orientation: "h", y: 1.12, x: 1, xanchor: "right"},
      shapes: eventShapes(), hovermode: "x unified", uirevision: state.primary}, extra || {});
  }
  const CFG = {displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"]};

  function lineTraces(col, opts) {
    return shownRuns().map((run) => {
      const d = state.data[run];
      return Object.assign({type: "scatter",
        mode: "lines", name: esc(run), x: d.step, y: d[col], connectgaps: false,
        line: {color: runColor(run), width: run === state.primary ? 1.6 : 1.1}}, opts || {});
    });
  }
  function skippedTrace(col) {
    const d = state.data[state.primary];
    if (!d || !d.skipped) return [];
    const xs = [], ys = [];
    d.step.forEach((s, i) => { if (d.skipped[i] > 0) { xs.push(s); ys.push(d[col] && d[col][i] !== null ? d[col][i] : null); } });
    return xs.length ? [{type: "scatter", mode: "markers", name: "skipped", x: xs, y: ys.map((y) => y ?? 1),
      marker: {symbol: "x", color: "#d62728", size: 8}}] : [];
  }
  function eventMarkers(col) {
    const d = state.data[state.primary];
    if (!d || !state.events.length) return [];
    const xs = [], ys = [], tx = [];
    for (const e of state.events.slice(0, 500)) {
      let i = d.step.findIndex((s) => s >= e.step);
      if (i < 0) i = d.step.length - 1;
      xs.push(e.step); ys.push(d[col] && d[col][i] !== null ? d[col][i] : null);
      tx.push(esc(e.kind + ": " + e.message));
    }
    return [{type: "scatter", mode: "markers", name: "events", x: xs, y: ys, text: tx, hoverinfo: "text",
      marker: {symbol: "diamond", size: 9, color: state.events.slice(0, 500).map((e) => SEV[e.severity] || "#888"),
               line: {color: "#fff", width: 1}}}];
  }

  function drawLines() {
    Plotly.react("chart-loss", [...lineTraces("loss"), ...eventMarkers("loss")],
      layout("loss", "loss", true), CFG);
    Plotly.react("chart-norm", [...lineTraces("global_norm"), ...skippedTrace("global_norm"), ...eventMarkers("global_norm")],
      layout("global gradient norm (pre-clip)", "‖g‖₂", true), CFG);
    Plotly.react("chart-clip", [...lineTraces("clip_coef"), ...skippedTrace("clip_coef")],
      layout("clip coefficient · skipped steps", "coef", false, {yaxis: {title: {text: "coef"}, rangemode: "tozero"}}), CFG);
  }

  function drawHeat() {
    const h = state.heat;
    if (!h) return;
    const ylab = h.layers.map((n, i) => i + ": " + esc(n));
    const hl = new Set(state.highlight);
    const shapes = [];
    h.layers.forEach((n, i) => {
      if (hl.has(n)) shapes.push({type: "rect", xref: "paper", yref: "y", x0: 0, x1: 1, y0: i - 0.5, y1: i + 0.5,
        line: {color: "#ff2d55", width: 2}, fillcolor: "rgba(0,0,0,0)"});
    });
    const nfx = [], nfy = [];
    h.nonfinite.forEach((row, i) => row.forEach((c, j) => { if (c > 0) { nfx.push(h.step[j]); nfy.push(i); } }));
    const text = h.layers.map((n) => h.step.map(() => esc(n)));
    const traces = [{type: "heatmap", x: h.step, y: h.layers.map((_, i) => i), z: h.log10_norm, text: text,
      colorscale: "Viridis", colorbar: {title: {text: "log₁₀‖g‖"}, thickness: 12},
      hovertemplate: "step %{x}<br>%{text}<br>log₁₀‖g‖ = %{z:.2f}<extra></extra>", zsmooth: false}];
    if (nfx.length) traces.push({type: "scatter", mode: "markers", name: "NaN/Inf", x: nfx, y: nfy,
      marker: {symbol: "x", color: "#ff2d55", size: 7}, hoverinfo: "skip"});
    const many = h.layers.length > 40;
    Plotly.react("chart-heat", traces, {
      title: {text: "per-layer gradient norm (bucket max), layers by depth", font: {size: 14}, x: 0.01},
      margin: {l: many ? 60 : 180, r: 20, t: 30, b: 36}, xaxis: xaxis(), showlegend: false, shapes: shapes,
      yaxis: {autorange: "reversed", tickvals: many ? undefined : h.layers.map((_, i) => i),
              ticktext: many ? undefined : ylab, title: {text: many ? "layer (depth)" : ""}},
      uirevision: state.primary}, CFG);
  }

  // ---------------------------------------------------------- events/table
  function renderEvents() {
    const ol = $("events");
    $("n-events").textContent = "(" + state.events.length + ")";
    ol.replaceChildren(...state.events.map((e, k) => {
      const li = el("li", e.severity);
      li.dataset.step = e.step; li.dataset.index = k;
      li.append(el("div", "ev-head", "step " + e.step + " · " + e.severity + " · " + e.kind));
      if (e.layers && e.layers.length) li.append(el("div", "ev-layers", e.layers.slice(0, 6).join(", ") + (e.layers.length > 6 ? " …" : "")));
      li.append(el("div", "ev-msg", e.message));
      if (e.advice && e.advice.length) {
        const ul = el("ul", "ev-advice");
        e.advice.forEach((a) => ul.append(el("li", null, a)));
        li.append(ul);
      }
      li.addEventListener("click", () => focusEvent(e, li));
      return li;
    }));
  }
  function renderLayers() {
    const tb = $("layers").tBodies[0];
    const hl = new Set(state.highlight);
    const finite = (v) => Number.isFinite(num(v));
    const top = Math.max(...state.layers.map((l) => (finite(l.max) ? l.max : 0)));
    tb.replaceChildren(...state.layers.map((l, i) => {
      const tr = el("tr", hl.has(l.name) ? "hl" : "");
      tr.append(el("td", "num", i), el("td", "name", l.name), el("td", null, "[" + l.shape.join(", ") + "]"),
        el("td", "num", fmt(l.latest)), el("td", "num", fmt(l.max)), el("td", "num", fmt(l.min)), el("td", "num", l.nonfinite));
      const flags = el("td");
      if (l.nonfinite > 0) flags.append(el("span", "flag bad", "non-finite"));
      if (Number.isNaN(num(l.latest))) flags.append(el("span", "flag", "no grad (latest)"));
      if (finite(l.max) && l.max === top && state.layers.length > 1) flags.append(el("span", "flag warn", "largest"));
      if (finite(l.max) && l.max < 1e-7) flags.append(el("span", "flag warn", "vanishing"));
      tr.append(flags);
      return tr;
    }));
  }

  function focusEvent(e, li) {
    document.querySelectorAll("#events li.active").forEach((x) => x.classList.remove("active"));
    if (li) li.classList.add("active");
    const info = state.runs.find((r) => r.name === state.primary) || {};
    const w = Math.max(10, Math.round(0.02 * (info.last_step || 100)));
    state.highlight = e.layers || [];
    setRange([e.step - w, e.step + w]);
    renderLayers();
  }
  async function setRange(range) {
    state.range = range;
    if (!STATIC) await loadSeries(); else { drawLines(); drawHeat(); bindZoom(); }
    document.body.dataset.zoom = range ? range.join(",") : "";
  }

  // --------------------------------------------------------------- loading
  async function loadSeries() {
    const runs = [state.primary, ...state.overlay];
    const got = await Promise.all(runs.map((r) => api(q(r, "steps", state.range, STATIC ? null : 2000)).catch(() => null)));
    runs.forEach((r, i) => { if (got[i]) state.data[r] = got[i]; else delete state.data[r]; });
    state.heat = await api(q(state.primary, "heatmap", state.range, STATIC ? null : 400)).catch(() => null);
    drawLines(); drawHeat(); bindZoom();
  }
  function bindZoom() {
    charts.forEach((id) => {
      const div = $(id);
      if (div.on && !div.ggBound) { div.on("plotly_relayout", onRelayout(id)); div.ggBound = true; }
    });
  }
  function ago(t) {
    if (!t) return "never";
    const s = Math.max(0, Date.now() / 1000 - t);
    return s < 90 ? Math.round(s) + " s ago" : s < 5400 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
  }
  // What the header says about the shown run: its writer's last heartbeat, never "now".
  function liveText(info) {
    if (STATIC) return "static report";
    if (!info) return "no runs yet";
    if (info.status === "unreadable") return "cannot read this run: " + (info.error || "unknown error");
    let t = (info.status === "running" ? "live" : info.status) + " · last update " + ago(info.updated_time);
    if (info.dropped_rows) t += " · " + info.dropped_rows + " rows lost";
    if (info.error) t += " · " + info.error;
    return t;
  }
  async function refresh(full) {
    if (!state.primary) return;
    const cur = state.runs.find((r) => r.name === state.primary);
    if (cur && cur.status === "unreadable") { renderRunPicker(); document.body.dataset.ready = "1"; return; }
    if (full) {
      state.events = await api(q(state.primary, "events")).catch(() => []);
      state.layers = await api(q(state.primary, "layers")).catch(() => []);
      renderEvents(); renderLayers();
    }
    await loadSeries();
    renderRunPicker();
    document.body.dataset.ready = "1";
  }
  async function poll() {
    try {
      const runs = await api("api/runs");
      state.runs = runs;
      if (!state.primary || !runs.some((r) => r.name === state.primary)) {
        const guarded = runs.length ? runs[runs.length - 1].name : null;
        state.primary = guarded; state.overlay.clear(); state.range = null; state.highlight = []; state.sig = "";
      }
      const info = runs.find((r) => r.name === state.primary);
      const sig = info ? info.last_step + "/" + info.n_events + "/" + info.status : "";
      renderRunPicker();
      if (sig !== state.sig) {
        state.sig = sig;
        await refresh(true);
      }
      $("live").textContent = liveText(info);
    } catch (err) {
      $("live").textContent = "offline: " + err.message;
    }
  }

  // ------------------------------------------------------- zoom in sync
  function onRelayout(src) {
    return (ev) => {
      if (state.syncing) return;
      let r = null;
      if (ev["xaxis.range[0]"] !== undefined) r = [ev["xaxis.range[0]"], ev["xaxis.range[1]"]];
      else if (ev["xaxis.range"]) r = ev["xaxis.range"];
      else if (!ev["xaxis.autorange"]) return;
      state.syncing = true;
      setRange(r).finally(() => { state.syncing = false; });
    };
  }

  $("run").addEventListener("change", (e) => {
    state.primary = e.target.value; state.overlay.delete(state.primary); state.range = null;
    state.highlight = []; state.sig = ""; poll();
  });
  $("reset").addEventListener("click", () => { state.highlight = []; renderLayers(); setRange(null); });
  (async () => {
    await poll();
    if (!STATIC) setInterval(() => { if (!state.range) poll(); }, 2000);
  })();
  if (STATIC) window.GG_STATE = state;
})();
