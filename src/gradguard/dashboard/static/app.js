// gradguard dashboard: draws runs from the JSON API (or, in a static report,
// from the JSON embedded in the page).  All user-supplied text (run and layer
// names, messages, advice) goes into the DOM through textContent, and into
// Plotly labels HTML-escaped: nothing from a run is ever parsed as markup.
"use strict";
(function () {
  const embedded = document.getElementById("gg-data");
  const STATIC = embedded ? JSON.parse(embedded.textContent) : null;
  const COLORS = ["#3a7bd5", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
  const SEV = {critical: "#d62728", warning: "#ff9f1c", info: "#3a7bd5"};
  const GROUP_AT = 64;     // more tensors than this: the heatmap groups them by module
  const MAX_GROUPS = 40;   // the deepest name prefix giving at most this many groups
  const LABEL_ROWS = 80;   // at most this many heatmap rows get a tick label each
  // selected: the compared runs, the primary first.  data/heat/layers/events: per run.
  const state = {runs: [], selected: [], range: null, highlight: [], data: {}, heat: {}, layers: {},
                 events: {}, sig: "", syncing: false, expanded: new Set(), sort: null, filter: "",
                 heatRows: [], logDir: null, started: false, gen: 0, fullGen: 0};
  const charts = ["chart-loss", "chart-norm", "chart-clip", "chart-heat"];
  const $ = (id) => document.getElementById(id);
  const primary = () => state.selected[0] || null;

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
  // A run's colour is its position among all runs (oldest first): the same in every panel.
  function runColor(run) { return COLORS[Math.max(0, state.runs.findIndex((r) => r.name === run)) % COLORS.length]; }
  function swatch(run) { const s = el("span", "swatch"); s.style.background = runColor(run); return s; }

  // ------------------------------------------------------------ run list
  // Running runs first (one opens the page to watch them), then runs with events (what went
  // wrong is what one opens it for next), newest first within each.
  function listed() {
    return state.runs.slice().sort((a, b) => ((b.status === "running") - (a.status === "running")) ||
      ((b.n_events > 0) - (a.n_events > 0)) ||
      ((b.start_time || 0) - (a.start_time || 0)) || (a.name < b.name ? -1 : 1));
  }
  function select(names) {
    state.selected = names.filter((n, i) => n && names.indexOf(n) === i && state.runs.some((r) => r.name === n));
    state.range = null; state.highlight = []; state.sig = "";
    if (!STATIC) history.replaceState(null, "", "#runs=" + state.selected.map(encodeURIComponent).join(","));
  }
  function renderRunList() {
    const sel = $("run");
    const names = state.runs.map((r) => r.name);
    if (Array.from(sel.options).map((o) => o.value).join("\n") !== names.join("\n")) {
      sel.replaceChildren(...names.map((n) => { const o = el("option", null, n); o.value = n; return o; }));
    }
    sel.value = primary() || "";
    $("n-runs").textContent = "(" + state.runs.length + ")";
    $("runlist").tBodies[0].replaceChildren(...listed().map((r) => {
      const tr = el("tr", state.selected.includes(r.name) ? "on" : "");
      tr.dataset.run = r.name;
      const cb = el("input");
      cb.type = "checkbox"; cb.value = r.name; cb.checked = state.selected.includes(r.name);
      cb.disabled = cb.checked && state.selected.length === 1;   // one run always stays shown
      cb.addEventListener("change", () => {
        select(cb.checked ? [...state.selected, r.name] : state.selected.filter((n) => n !== r.name));
        poll();
      });
      const name = el("td", "name");
      const a = el("button", "linklike", r.name);
      a.type = "button";
      a.addEventListener("click", () => { select([r.name, ...state.selected]); poll(); });
      name.append(swatch(r.name), a);
      const st = el("td"); st.append(el("span", "badge " + r.status, r.status));
      const started = r.start_time ? new Date(r.start_time * 1000).toLocaleString() : "–";
      tr.append(el("td"), name, st, el("td", "num", r.last_step ?? "–"), el("td", "num", r.skipped ?? 0),
                el("td", "num", r.n_events), el("td", null, started));
      tr.firstChild.append(cb);
      return tr;
    }));
    const info = state.runs.find((r) => r.name === primary());
    const badge = $("status");
    badge.textContent = info ? info.status + " · step " + (info.last_step ?? "–") : "no runs yet";
    badge.className = "badge " + (info ? info.status : "");
    const empty = $("empty");
    empty.hidden = state.runs.length > 0;
    if (!state.runs.length) {
      empty.textContent = "No runs in " + (state.logDir || "this log dir") + " yet: start one with " +
        "`gradguard demo` or gg.Guard(model, optimizer, log_dir=...).";
    }
  }

  // ------------------------------------------------------------- charts
  function shownRuns() { return state.selected.filter((r) => state.data[r]); }
  function xaxis() {
    const ax = {title: {text: "step"}, zeroline: false};
    if (state.range) { ax.range = state.range.slice(); ax.autorange = false; } else ax.autorange = true;
    return ax;
  }
  function allEvents() {
    const out = [];
    state.selected.forEach((run) => (state.events[run] || []).forEach((e) => out.push(Object.assign({run: run}, e))));
    return out.sort((a, b) => a.step - b.step);
  }
  function eventShapes() {
    return allEvents().slice(0, 300).map((e) => ({
      type: "line", xref: "x", yref: "paper", x0: e.step, x1: e.step, y0: 0, y1: 1,
      line: {color: SEV[e.severity] || "#888", width: 1, dash: "dot"}, opacity: 0.7}));
  }
  // Log-axis ticks as numbers one reads as such (1e-3, 0.01, 1, 100, 1e3), never Plotly's
  // minor digits ("2 3 4 5" next to 10, read as small values).
  function tickLabel(m, k) {
    if (k >= -2 && k <= 2) return String(Number((m * Math.pow(10, k)).toPrecision(3)));
    return (m === 1 ? "1" : String(m)) + "e" + k;
  }
  function logTicks(traces) {
    let lo = Infinity, hi = -Infinity;
    traces.forEach((t) => (t.y || []).forEach((v) => { if (v > 0 && Number.isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); } }));
    if (!Number.isFinite(lo)) return {};
    const a = Math.floor(Math.log10(lo)), b = Math.max(a + 1, Math.ceil(Math.log10(hi)));
    const step = Math.max(1, Math.ceil((b - a) / 8));
    const mults = b - a <= 2 ? [1, 2, 5] : [1];
    const vals = [], text = [];
    for (let k = a; k <= b; k += step) {
      for (const m of mults) {
        if (k === b && m > 1) continue;
        vals.push(m * Math.pow(10, k)); text.push(tickLabel(m, k));
      }
    }
    return {tickmode: "array", tickvals: vals, ticktext: text};
  }
  function layout(title, ytitle, traces, ylog, extra) {
    const yaxis = Object.assign({title: {text: ytitle}, type: ylog ? "log" : "linear"}, ylog ? logTicks(traces) : {});
    return Object.assign({title: {text: title, font: {size: 14}, x: 0.01}, margin: {l: 60, r: 20, t: 52, b: 36},
      xaxis: xaxis(), yaxis: yaxis,
      // the legend sits above the plot area, never over a line at the top (a clip coefficient of 1)
      showlegend: true, legend: {orientation: "h", y: 1.0, yanchor: "bottom", x: 1, xanchor: "right"},
      shapes: eventShapes(), hovermode: "x unified", uirevision: state.selected.join("\n")}, extra || {});
  }
  const CFG = {displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"]};

  function lineTraces(col) {
    return shownRuns().map((run) => {
      const d = state.data[run];
      return {type: "scatter", mode: "lines", name: esc(run), x: d.step, y: d[col], connectgaps: false,
        meta: run, line: {color: runColor(run), width: run === primary() ? 1.8 : 1.3}};
    });
  }
  function skippedTraces(col) {
    return shownRuns().flatMap((run) => {
      const d = state.data[run];
      if (!d.skipped) return [];
      const xs = [], ys = [];
      d.step.forEach((s, i) => { if (d.skipped[i] > 0) { xs.push(s); ys.push(d[col] && d[col][i] !== null ? d[col][i] : null); } });
      return xs.length ? [{type: "scatter", mode: "markers", name: "skipped · " + esc(run), x: xs, y: ys.map((y) => y ?? 1),
        meta: run, marker: {symbol: "x", color: runColor(run), size: 8}}] : [];
    });
  }
  // One marker trace per run, on that run's own curve, in its colour (the outline: severity).
  function eventMarkers(col) {
    return shownRuns().flatMap((run) => {
      const d = state.data[run], evs = (state.events[run] || []).slice(0, 500);
      if (!evs.length || !d.step.length) return [];
      const xs = [], ys = [], tx = [];
      for (const e of evs) {
        let i = d.step.findIndex((s) => s >= e.step);
        if (i < 0) i = d.step.length - 1;
        xs.push(e.step); ys.push(d[col] && d[col][i] !== null ? d[col][i] : null);
        tx.push(esc(run + " · " + e.kind + ": " + e.message));
      }
      return [{type: "scatter", mode: "markers", name: "events · " + esc(run), x: xs, y: ys, text: tx, hoverinfo: "text",
        meta: run, marker: {symbol: "diamond", size: 9, color: runColor(run),
                            line: {color: evs.map((e) => SEV[e.severity] || "#888"), width: 2}}}];
    });
  }
  function drawLines() {
    const loss = [...lineTraces("loss"), ...eventMarkers("loss")];
    Plotly.react("chart-loss", loss, layout("loss", "loss", loss, true), CFG);
    const norm = [...lineTraces("global_norm"), ...skippedTraces("global_norm"), ...eventMarkers("global_norm")];
    Plotly.react("chart-norm", norm, layout("global gradient norm (pre-clip)", "‖g‖₂", norm, true), CFG);
    const clip = [...lineTraces("clip_coef"), ...skippedTraces("clip_coef")];
    Plotly.react("chart-clip", clip, layout("clip coefficient · skipped steps", "coef", clip, false,
      {yaxis: {title: {text: "coef"}, rangemode: "tozero"}}), CFG);
    Plotly.react("chart-lr", lrTraces(), layout("learning rate (every param group)", "lr", lrTraces(), false,
      {yaxis: {title: {text: "lr"}, rangemode: "tozero", exponentformat: "e"}}), CFG);
  }
  // Group 0's lr (the row's "lr") as a solid line, groups 1.. ("lr_group1" ...) dashed, per run colour.
  const DASHES = ["dash", "dot", "dashdot", "longdash", "longdashdot"];
  function lrTraces() {
    return shownRuns().flatMap((run) => {
      const d = state.data[run];
      const cols = ["lr", ...Object.keys(d).filter((k) => /^lr_group\d+$/.test(k))
        .sort((a, b) => +a.slice(8) - +b.slice(8))];
      return cols.filter((c) => d[c]).map((c, i) => ({type: "scatter", mode: "lines",
        name: esc(run) + (i ? " · group " + c.slice(8) : (cols.length > 1 ? " · group 0" : "")),
        x: d.step, y: d[c], connectgaps: false, meta: run,
        line: {color: runColor(run), width: 1.3, dash: i ? DASHES[(i - 1) % DASHES.length] : "solid"}}));
    });
  }

  // ------------------------------------------------------------ heatmap
  // Group keys for many tensors: the deepest dotted prefix (the parameter's own name left
  // out) that gives at most MAX_GROUPS groups, e.g. "transformer.h.3" for GPT-2's 148
  // tensors; names without such structure fall back to runs of 16 consecutive tensors.
  function groupKeys(names) {
    const parts = names.map((n) => n.split("."));
    const depth = Math.max(...parts.map((p) => p.length));
    let best = null;
    for (let d = 1; d < depth; d++) {
      const keys = parts.map((p) => p.slice(0, Math.max(1, Math.min(d, p.length - 1))).join("."));
      const n = new Set(keys).size;
      if (n > MAX_GROUPS) break;
      if (n > 1 || !best) best = keys;
    }
    if (best && new Set(best).size > 1) return best;
    return names.map((_, i) => "tensors " + (i - i % 16) + "–" + Math.min(names.length - 1, i - i % 16 + 15));
  }
  // Rows of one run's heatmap: a group row (max over its tensors, NaN/Inf counts summed), then
  // its tensors when expanded; without grouping one row per tensor.
  function heatRows(h) {
    const names = h.layers;
    if (names.length <= GROUP_AT) return names.map((n, i) => ({label: i + ": " + n, full: n, idx: [i], group: null}));
    const keys = groupKeys(names), order = [], members = {};
    keys.forEach((k, i) => { if (!(k in members)) { members[k] = []; order.push(k); } members[k].push(i); });
    const rows = [];
    for (const k of order) {
      const open = state.expanded.has(k);
      rows.push({label: (open ? "▾ " : "▸ ") + k + " (" + members[k].length + ")", full: k + " (" + members[k].length +
                 " tensors, max)", idx: members[k], group: k});
      if (open) members[k].forEach((i) => rows.push({label: "   " + (names[i].startsWith(k + ".") ? names[i].slice(k.length + 1) : names[i]),
                                                    full: names[i], idx: [i], group: null, member: k}));
    }
    return rows;
  }
  function rowValues(h, row) {
    if (row.idx.length === 1) return [h.log10_norm[row.idx[0]], h.nonfinite[row.idx[0]]];
    const z = h.step.map((_, j) => {
      let m = null;
      row.idx.forEach((i) => { const v = h.log10_norm[i][j]; if (v !== null && (m === null || v > m)) m = v; });
      return m;
    });
    return [z, h.step.map((_, j) => row.idx.reduce((s, i) => s + h.nonfinite[i][j], 0))];
  }
  function drawHeat() {
    const runs = state.selected.filter((r) => state.heat[r]);
    const div = $("chart-heat");
    if (!runs.length) { Plotly.purge(div); return; }
    const n = runs.length, gap = n > 1 ? 0.06 : 0, span = (1 - gap * (n - 1)) / n;
    const traces = [], shapes = [], annotations = [], hl = new Set(state.highlight);
    const lay = {title: {text: "per-layer gradient norm (bucket max, log₁₀), layers by depth", font: {size: 14}, x: 0.01},
                 // the step axis under the lowest run's map, not across the next run's title
                 xaxis: Object.assign(xaxis(), {anchor: n > 1 ? "y" + n : "y"}), showlegend: false,
                 uirevision: state.selected.join("\n")};
    let grouped = false, rowsTotal = 0, width = 0;
    state.heatRows = [];
    runs.forEach((run, k) => {
      const h = state.heat[run], rows = heatRows(h), ax = k ? "y" + (k + 1) : "y";
      grouped = grouped || rows.some((r) => r.group);
      rowsTotal += rows.length;
      const z = [], nf = [], nfx = [], nfy = [];
      rows.forEach((r, i) => {
        const [zr, nr] = rowValues(h, r);
        z.push(zr); nf.push(nr);
        nr.forEach((c, j) => { if (c > 0) { nfx.push(h.step[j]); nfy.push(i); } });
        const hit = r.idx.some((i2) => hl.has(h.layers[i2])) && (r.group === null || !state.expanded.has(r.group));
        if (hit) shapes.push({type: "rect", xref: "paper", yref: ax, x0: 0, x1: 1, y0: i - 0.5, y1: i + 0.5,
                              line: {color: "#ff2d55", width: 2}, fillcolor: "rgba(0,0,0,0)"});
      });
      state.heatRows.push({run: run, rows: rows, trace: traces.length});
      const text = rows.map((r) => h.step.map(() => esc(r.full)));
      traces.push({type: "heatmap", name: esc(run), meta: run, x: h.step, y: rows.map((_, i) => i), z: z, text: text,
        yaxis: ax, colorscale: "Viridis", zsmooth: false, coloraxis: "coloraxis",
        hovertemplate: esc(run) + "<br>step %{x}<br>%{text}<br>log₁₀‖g‖ = %{z:.2f}<extra></extra>"});
      if (nfx.length) traces.push({type: "scatter", mode: "markers", name: "NaN/Inf", x: nfx, y: nfy, yaxis: ax,
        marker: {symbol: "x", color: "#ff2d55", size: 7}, hoverinfo: "skip"});
      const labelled = rows.length <= LABEL_ROWS;
      const ticks = rows.map((r) => esc(r.label.length > 48 ? "…" + r.label.slice(-47) : r.label));
      if (labelled) width = Math.max(width, ...ticks.map((t) => t.length));
      const top = 1 - k * (span + gap);
      lay["yaxis" + (k ? k + 1 : "")] = {domain: [Math.max(0, top - span), top], autorange: "reversed",
        tickvals: labelled ? rows.map((_, i) => i) : undefined, ticktext: labelled ? ticks : undefined,
        title: {text: labelled ? "" : "layer (depth)"}, tickfont: {size: 11}};
      if (n > 1) annotations.push({text: esc(run), xref: "paper", yref: "paper", x: 0, y: top, yanchor: "bottom",
        xanchor: "left", showarrow: false, font: {color: runColor(run), size: 12}});
    });
    lay.shapes = shapes; lay.annotations = annotations;
    lay.coloraxis = {colorscale: "Viridis", colorbar: {title: {text: "log₁₀‖g‖"}, thickness: 12}};
    lay.margin = {l: Math.min(300, Math.max(60, 7 * width)), r: 20, t: 30 + (n > 1 ? 10 : 0), b: 36};
    // The height follows the rows shown; given to Plotly too (react does not re-measure the div).
    lay.height = Math.round(Math.max(360, Math.min(1400, n * Math.max(240, 14 * rowsTotal / n + 60))));
    div.style.height = lay.height + "px";
    Plotly.react(div, traces, lay, CFG);
    renderGroupChips(grouped);
  }
  function toggleGroup(g) {
    if (state.expanded.has(g)) state.expanded.delete(g); else state.expanded.add(g);
    drawHeat();
  }
  function renderGroupChips(grouped) {
    const box = $("heat-groups");
    box.hidden = !grouped;
    if (!grouped) { box.replaceChildren(); return; }
    const seen = [];
    state.heatRows.forEach((hr) => hr.rows.forEach((r) => { if (r.group && !seen.includes(r.group)) seen.push(r.group); }));
    box.replaceChildren(el("span", "hint", "Tensors grouped by module (click a group, here or in the heatmap, to expand it):"),
      ...seen.map((g) => {
        const b = el("button", "chip" + (state.expanded.has(g) ? " open" : ""), g);
        b.type = "button"; b.dataset.group = g;
        b.addEventListener("click", () => toggleGroup(g));
        return b;
      }));
  }
  function onHeatClick(ev) {
    const p = ev.points && ev.points[0];
    if (!p) return;
    const hr = state.heatRows.find((x) => x.trace === p.curveNumber);
    const row = hr && hr.rows[p.y];
    if (row && (row.group || row.member)) toggleGroup(row.group || row.member);
  }

  // ---------------------------------------------------------- events/table
  function renderEvents() {
    const ol = $("events"), evs = allEvents(), many = state.selected.length > 1;
    $("n-events").textContent = "(" + evs.length + ")";
    ol.replaceChildren(...evs.map((e, k) => {
      const li = el("li", e.severity);
      li.dataset.step = e.step; li.dataset.index = k; li.dataset.run = e.run;
      const head = el("div", "ev-head");
      if (many) { head.append(swatch(e.run), el("span", "ev-run", e.run)); }
      head.append(document.createTextNode("step " + e.step + " · " + e.severity + " · " + e.kind));
      li.append(head);
      if (e.layers && e.layers.length) li.append(el("div", "ev-layers", e.layers.slice(0, 6).join(", ") + (e.layers.length > 6 ? " …" : "")));
      li.append(el("div", "ev-msg", e.message));
      if (e.advice && e.advice.length) {
        const ul = el("ul", "ev-advice");
        e.advice.forEach((a) => ul.append(el("li", null, a)));
        li.append(ul);
      }
      // what a remedy did about it (event.data.actions: "step skipped", "rolled back to ...")
      const acts = e.data && Array.isArray(e.data.actions) ? e.data.actions : [];
      if (acts.length) {
        const ul = el("ul", "ev-actions");
        acts.forEach((a) => ul.append(el("li", null, "done: " + String(a))));
        li.append(ul);
      }
      li.addEventListener("click", () => focusEvent(e, li));
      return li;
    }));
  }
  // Columns: the primary run's, then one "max norm" column per compared run.
  function layerColumns() {
    const cols = [{key: "index", label: "#", num: true}, {key: "name", label: "layer"}, {key: "shape", label: "shape"},
      {key: "latest", label: "latest norm", num: true}, {key: "max", label: "max norm", num: true},
      {key: "min", label: "min norm", num: true}, {key: "nonfinite", label: "non-finite steps", num: true},
      {key: "weight", label: "weight norm", num: true}, {key: "weight_growth", label: "weight × start", num: true}];
    state.selected.slice(1).forEach((run) => cols.push({key: "max@" + run, label: "max norm · " + run, num: true, run: run}));
    cols.push({key: "flags", label: "flags", nosort: true});
    return cols;
  }
  function layerRows() {
    const byRun = {}, rows = [], seen = new Map();
    state.selected.forEach((run) => { byRun[run] = new Map((state.layers[run] || []).map((l) => [l.name, l])); });
    state.selected.forEach((run) => (state.layers[run] || []).forEach((l) => {
      if (seen.has(l.name)) return;
      const base = run === primary() ? l : {name: l.name, shape: l.shape, latest: null, max: null, min: null, nonfinite: null,
        weight: null, weight_growth: null, other: true};
      const r = Object.assign({index: seen.size}, base);
      state.selected.slice(1).forEach((o) => { const x = byRun[o].get(l.name); r["max@" + o] = x ? x.max : null; });
      seen.set(l.name, r); rows.push(r);
    }));
    return rows;
  }
  function sortValue(r, key) {
    if (key === "name") return r.name;
    if (key === "shape") return r.shape.reduce((a, b) => a * b, 1);
    return num(r[key]);
  }
  function renderLayers() {
    const cols = layerColumns(), hl = new Set(state.highlight), s = state.sort;
    const head = $("layers").tHead.rows[0];
    head.replaceChildren(...cols.map((c) => {
      const th = el("th", c.nosort ? "" : "sortable", c.label);
      th.dataset.key = c.key;
      if (c.run) th.prepend(swatch(c.run));
      if (s && s.key === c.key) th.dataset.sort = s.dir;
      if (!c.nosort) th.addEventListener("click", () => {
        state.sort = {key: c.key, dir: s && s.key === c.key ? (s.dir === "asc" ? "desc" : "asc") : (c.num && c.key !== "index" ? "desc" : "asc")};
        renderLayers();
      });
      return th;
    }));
    let rows = layerRows();
    const total = rows.length, f = state.filter.toLowerCase();
    if (f) rows = rows.filter((r) => r.name.toLowerCase().includes(f));
    if (s) {
      const sign = s.dir === "asc" ? 1 : -1;
      rows.sort((a, b) => {
        const x = sortValue(a, s.key), y = sortValue(b, s.key);
        if (typeof x === "string") return sign * x.localeCompare(y);
        const nx = Number.isNaN(x), ny = Number.isNaN(y);  // no value: always last
        if (nx || ny) return nx - ny;
        return sign * (x - y) || a.index - b.index;
      });
    }
    $("n-layers").textContent = "(" + (rows.length === total ? total : rows.length + " of " + total) + ")";
    const mine = state.layers[primary()] || [];
    const finite = (v) => Number.isFinite(num(v));
    const top = Math.max(...mine.map((l) => (finite(l.max) ? l.max : 0)));
    $("layers").tBodies[0].replaceChildren(...rows.map((l) => {
      const tr = el("tr", hl.has(l.name) ? "hl" : "");
      tr.append(el("td", "num", l.index), el("td", "name", l.name), el("td", null, "[" + l.shape.join(", ") + "]"),
        el("td", "num", fmt(l.latest)), el("td", "num", fmt(l.max)), el("td", "num", fmt(l.min)), el("td", "num", l.nonfinite ?? "–"),
        el("td", "num", fmt(l.weight)), el("td", "num", finite(l.weight_growth) ? fmt(l.weight_growth) : "–"));  // NaN: started at 0
      state.selected.slice(1).forEach((o) => tr.append(el("td", "num", fmt(l["max@" + o]))));
      const flags = el("td");
      if (l.nonfinite > 0) flags.append(el("span", "flag bad", "non-finite"));
      if (!l.other && Number.isNaN(num(l.latest))) flags.append(el("span", "flag", "no grad (latest)"));
      if (finite(l.max) && l.max === top && mine.length > 1) flags.append(el("span", "flag warn", "largest"));
      if (finite(l.max) && l.max < 1e-7) flags.append(el("span", "flag warn", "vanishing"));
      if (finite(l.weight_growth) && l.weight_growth >= 10) flags.append(el("span", "flag warn", "weights ×10"));
      tr.append(flags);
      return tr;
    }));
  }

  function focusEvent(e, li) {
    document.querySelectorAll("#events li.active").forEach((x) => x.classList.remove("active"));
    if (li) li.classList.add("active");
    const info = state.runs.find((r) => r.name === e.run) || {};
    const w = Math.max(10, Math.round(0.02 * (info.last_step || 100)));
    state.highlight = e.layers || [];
    // Open the heatmap groups holding the event's layers, so the highlight lands on them.
    state.heatRows.forEach((hr) => hr.rows.forEach((r) => {
      if (r.group && r.idx.some((i) => state.highlight.includes(state.heat[hr.run].layers[i]))) state.expanded.add(r.group);
    }));
    setRange([e.step - w, e.step + w]);
    renderLayers();
  }
  async function setRange(range) {
    state.range = range;
    if (!STATIC) await loadSeries(); else { drawLines(); drawHeat(); bindZoom(); }
    document.body.dataset.zoom = range ? range.join(",") : "";
  }

  // --------------------------------------------------------------- loading
  // A selection or zoom change starts a new load while an older one may still be in flight:
  // only the newest one's answers are kept (an older one finishing last would draw old runs).
  async function loadSeries() {
    const gen = ++state.gen;
    const runs = state.selected.slice();
    const pts = (n) => (STATIC ? null : n);
    const [steps, heats] = await Promise.all([
      Promise.all(runs.map((r) => api(q(r, "steps", state.range, pts(2000))).catch(() => null))),
      Promise.all(runs.map((r) => api(q(r, "heatmap", state.range, pts(400))).catch(() => null)))]);
    if (gen !== state.gen) return;
    state.data = {}; state.heat = {};
    runs.forEach((r, i) => { if (steps[i]) state.data[r] = steps[i]; if (heats[i]) state.heat[r] = heats[i]; });
    drawLines(); drawHeat(); bindZoom();
  }
  function bindZoom() {
    charts.forEach((id) => {
      const div = $(id);
      if (div.on && !div.ggBound) {
        div.on("plotly_relayout", onRelayout(id));
        if (id === "chart-heat") div.on("plotly_click", onHeatClick);
        div.ggBound = true;
      }
    });
  }
  function ago(t) {
    if (!t) return "never";
    const s = Math.max(0, Date.now() / 1000 - t);
    return s < 90 ? Math.round(s) + " s ago" : s < 5400 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
  }
  // What the header says about the primary run: its writer's last heartbeat, never "now".
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
    const readable = state.selected.filter((n) => (state.runs.find((r) => r.name === n) || {}).status !== "unreadable");
    if (full) {
      const gen = ++state.fullGen;
      const [evs, lays] = await Promise.all([
        Promise.all(readable.map((r) => api(q(r, "events")).catch(() => []))),
        Promise.all(readable.map((r) => api(q(r, "layers")).catch(() => [])))]);
      if (gen !== state.fullGen) return;
      state.events = {}; state.layers = {};
      readable.forEach((r, i) => { state.events[r] = evs[i]; state.layers[r] = lays[i]; });
      renderEvents(); renderLayers();
    }
    await loadSeries();
    renderRunList();
    document.body.dataset.ready = "1";
  }
  function initialSelection(runs) {
    if (STATIC && STATIC.report) return STATIC.report.runs;
    const m = /^#runs=(.*)$/.exec(location.hash);
    if (m) {
      const dec = (x) => { try { return decodeURIComponent(x); } catch (e) { return null; } };  // a mangled link
      const want = m[1].split(",").map(dec).filter((n) => runs.some((r) => r.name === n));
      if (want.length) return want;
    }
    // The first view compares: the first two runs of the list (e.g. the demo's unguarded run,
    // whose events lead the list, against the guarded one).
    return listed().slice(0, 2).map((r) => r.name);
  }
  async function poll() {
    try {
      if (!STATIC && state.logDir === null) {
        state.logDir = (await api("api/info").catch(() => ({}))).log_dir || "";
        $("logdir").textContent = state.logDir ? "log dir: " + state.logDir : "";
      }
      const runs = await api("api/runs");
      state.runs = runs;
      const gone = state.selected.some((n) => !runs.some((r) => r.name === n));
      if (!state.started || gone || (!state.selected.length && runs.length)) {
        select(state.started ? state.selected : initialSelection(runs));
        if (!state.selected.length && runs.length) select(initialSelection(runs));
        state.started = true;
      }
      const sig = state.selected.map((n) => { const i = runs.find((r) => r.name === n);
        return i.last_step + "/" + i.n_events + "/" + i.status; }).join("|") + "#" + state.selected.join("\n");
      renderRunList();
      if (sig !== state.sig) {
        state.sig = sig;
        await refresh(true);
      }
      document.body.dataset.ready = "1";
      $("live").textContent = liveText(runs.find((r) => r.name === primary()));
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

  $("run").addEventListener("change", (e) => { select([e.target.value, ...state.selected]); poll(); });
  $("reset").addEventListener("click", () => { state.highlight = []; renderLayers(); setRange(null); });
  $("layer-filter").addEventListener("input", (e) => { state.filter = e.target.value; renderLayers(); });
  (async () => {
    await poll();
    if (!STATIC) setInterval(() => { if (!state.range) poll(); }, 2000);
  })();
  window.GG_STATE = state;
})();
