// FusionBench web page: Compose, Run and Results views over the JSON API of fusion_bench_webui.
// Every string from a config, report or log reaches the page as text (textContent), never as HTML.
"use strict";

const TOKEN_HEADER = "X-FusionBench-Token";
const state = { overrides: [], config: null, startedHere: new Set(), selectedRun: null, logEnd: 0 };

// ---------- helpers ----------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
const $ = (id) => document.getElementById(id);
function plotText(s) { return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }
function shellQuote(s) { return /^[\w@%+=:,./\[\]-]+$/.test(s) ? s : "'" + s.replace(/'/g, "'\\''") + "'"; }
function fmt(v, digits = 1) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }
async function getJSON(url) { const r = await fetch(url); return r.json(); }
function token() {
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    sessionStorage.setItem("fusionbench-token", params.get("token"));
    params.delete("token");
    history.replaceState(null, "", location.pathname + (params.toString() ? "?" + params : ""));
  }
  return sessionStorage.getItem("fusionbench-token") || "";
}

// ---------- state in the URL ----------
function readOverrides() {
  const out = [];
  for (const [k, v] of new URLSearchParams(location.search)) if (k !== "token" && k !== "report") out.push([k, v]);
  return out;
}
function query() {
  const p = new URLSearchParams();
  for (const [k, v] of state.overrides) p.append(k, v);
  return p.toString();
}
function writeURL() { history.replaceState(null, "", location.pathname + (state.overrides.length ? "?" + query() : "")); updateNav(); }
function updateNav() {
  const q = state.overrides.length ? "?" + query() : "";
  for (const v of ["compose", "run", "results"]) {
    const a = $("nav-" + v);
    a.href = (v === "compose" ? "/" : "/" + v) + q;
    a.classList.toggle("active", currentView() === v);
  }
}
function overrideStrings() { return state.overrides.map(([k, v]) => `${k}=${v}`); }
function getOverride(key) { const f = state.overrides.find(([k]) => k === key); return f ? f[1] : undefined; }
function setOverride(key, value) {
  const i = state.overrides.findIndex(([k]) => k === key);
  if (value === undefined) { if (i >= 0) state.overrides.splice(i, 1); }
  else if (i >= 0) state.overrides[i][1] = value; else state.overrides.push([key, value]);
}

// ---------- views ----------
function currentView() { return location.pathname === "/run" ? "run" : location.pathname === "/results" ? "results" : "compose"; }
function show(view, push) {
  if (push) history.pushState(null, "", (view === "compose" ? "/" : "/" + view) + (state.overrides.length ? "?" + query() : ""));
  for (const v of ["compose", "run", "results"]) $("view-" + v).hidden = v !== view;
  updateNav();
  if (view === "compose") renderCompose();
  if (view === "run") pollRuns();
  if (view === "results") loadResults();
}

// ---------- Compose ----------
function choiceOf(group) { const v = getOverride(group); return v !== undefined ? v : state.config.groups[group].default; }
let renderSeq = 0;
async function renderCompose() {
  const seq = ++renderSeq;  // a newer render supersedes this one (no duplicated blocks)
  if (!state.config) state.config = await getJSON("/api/config");
  if (seq !== renderSeq) return;
  const groups = el("div");
  for (const group of state.config.order) {
    const info = state.config.groups[group];
    const select = el("select", { id: "group-" + group.replace("/", "-"), "data-group": group });
    if (!info.default) select.append(el("option", { value: "" }, "(Hydra's default)"));
    for (const name of info.choices) select.append(el("option", { value: name }, name + (name === info.default ? " (default)" : "")));
    const chosen = choiceOf(group);
    if (chosen && !info.choices.includes(chosen)) select.append(el("option", { value: chosen }, chosen + " (unknown)"));
    select.value = chosen;
    select.addEventListener("change", () => {
      state.overrides = state.overrides.filter(([k]) => k !== group && !k.startsWith(group + "."));
      if (select.value !== info.default) setOverride(group, select.value);
      renderCompose();
    });
    groups.append(el("div", { class: "group" }, el("label", { for: select.id }, group), select));
  }
  const options = el("div");
  options.append(optionBlock("", "", "run", state.config.root));
  const groupsShown = ["method", "modelpool", "taskpool", "fabric"];
  const found = await Promise.all(groupsShown.map((group) =>
    fetch(`/api/options?group=${encodeURIComponent(group)}&name=${encodeURIComponent(choiceOf(group))}`).then((r) => r.ok ? r.json() : null)));
  if (seq !== renderSeq) return;
  groupsShown.forEach((group, i) => { if (found[i]) options.append(optionBlock(group, choiceOf(group), `${group}: ${choiceOf(group)}`, found[i])); });
  $("groups").replaceChildren(...groups.childNodes);
  $("options").replaceChildren(...options.childNodes);
  changed();
}
function optionBlock(group, name, title, info) {
  const box = el("div", { class: "block" }, el("h3", {}, title));
  if (info.description) box.append(el("p", { class: "note" }, info.description));
  for (const opt of info.options) {
    const key = group ? `${group}.${opt.key}` : opt.key;
    const value = getOverride(key);
    const row = el("div", { class: "option" + (value !== undefined ? " set" : "") }, el("span", { class: "key" }, key));
    if (opt.nested) {
      row.append(el("span", { class: "note" }, "(nested, see the config)"), el("span"), el("span", { class: "comment" }, opt.comment));
    } else {
      const input = el("input", { "data-key": key, value: value !== undefined ? value : opt.default, title: "default: " + opt.default });
      input.addEventListener("input", () => { setOverride(key, input.value); row.classList.add("set"); changed(); });
      const reset = el("button", { type: "button", title: "back to the default " + opt.default, "aria-label": "reset " + key }, "×");
      reset.addEventListener("click", () => { setOverride(key, undefined); input.value = opt.default; row.classList.remove("set"); changed(); });
      row.append(input, reset, el("span", { class: "comment" }, `default ${opt.default}` + (opt.comment ? ` — ${opt.comment}` : "")));
    }
    box.append(row);
  }
  return box;
}
let composeTimer = null, composeSeq = 0;
function changed() {
  writeURL();
  $("command").textContent = ["fusion_bench", ...overrideStrings().map(shellQuote)].join(" ");
  clearTimeout(composeTimer);
  composeTimer = setTimeout(async () => {
    const seq = ++composeSeq;
    const params = new URLSearchParams();
    for (const o of overrideStrings()) params.append("o", o);
    const result = await getJSON("/api/compose?" + params);
    if (seq !== composeSeq) return;
    $("compose-error").textContent = result.error || "";
    $("yaml").textContent = result.yaml;
    $("start-run").disabled = !!result.error;
  }, 150);
}
async function startRun() {
  $("start-status").textContent = "";
  const r = await fetch("/api/runs", { method: "POST", headers: { "Content-Type": "application/json", [TOKEN_HEADER]: token() },
    body: JSON.stringify({ overrides: overrideStrings() }) });
  const body = await r.json();
  if (!r.ok) { $("start-status").textContent = body.error; return; }
  state.startedHere.add(body.id);
  state.selectedRun = body.id;
  state.logEnd = 0;
  $("log").textContent = "";
  show("run", true);
}

// ---------- Run ----------
let pollTimer = null;
async function pollRuns() {
  clearTimeout(pollTimer);
  if (currentView() !== "run") return;
  const { runs } = await getJSON("/api/runs");
  const body = $("runs-table").tBodies[0];
  body.replaceChildren();
  if (!state.selectedRun && runs.length) state.selectedRun = runs[runs.length - 1].id;
  for (const run of runs) {
    const actions = el("td");
    if (run.state === "queued" || run.state === "running") {
      actions.append(el("button", { type: "button", onclick: () => cancelRun(run.id) }, "Cancel"));
    }
    if (run.report) actions.append(" ", el("a", { href: "/results?report=" + encodeURIComponent(run.report) }, "report"));
    const tr = el("tr", { class: run.id === state.selectedRun ? "highlight" : null, "data-run": run.id },
      el("td", {}, el("a", { href: "#", onclick: (e) => { e.preventDefault(); state.selectedRun = run.id; state.logEnd = 0; $("log").textContent = ""; pollRuns(); } }, run.id)),
      el("td", { class: "state-" + run.state }, run.state), el("td", {}, run.elapsed === null ? "" : run.elapsed),
      el("td", { class: "argv" }, ["fusion_bench", ...run.argv.slice(2)].map(shellQuote).join(" ")), actions);
    body.append(tr);
  }
  let active = false;
  if (state.selectedRun) {
    const run = await getJSON(`/api/runs/${encodeURIComponent(state.selectedRun)}?since=${state.logEnd}`);
    if (run.log) {
      $("log-title").textContent = `${run.id} (${run.state})`;
      if (run.log.length) { $("log").append(run.log.join("\n") + "\n"); $("log").scrollTop = $("log").scrollHeight; }
      state.logEnd = run.log_end;
      active = run.state === "queued" || run.state === "running";
      if (!active && run.state === "done" && run.report && state.startedHere.has(run.id)) {
        state.startedHere.delete(run.id);
        history.pushState(null, "", "/results?report=" + encodeURIComponent(run.report));
        state.overrides = [];
        show("results", false);
        return;
      }
    }
  }
  active = active || runs.some((r) => r.state === "queued" || r.state === "running");
  pollTimer = setTimeout(pollRuns, active ? 500 : 2000);
}
async function cancelRun(id) {
  await fetch(`/api/runs/${encodeURIComponent(id)}/cancel`, { method: "POST", headers: { [TOKEN_HEADER]: token() } });
  pollRuns();
}

// ---------- Results ----------
const PLOTLY = "/static/plotly.min.js";
let plotlyLoaded = null;
function loadPlotly() {
  if (!plotlyLoaded) plotlyLoaded = new Promise((resolve, reject) => {
    const s = el("script", { src: PLOTLY });
    s.onload = resolve; s.onerror = reject;
    document.head.append(s);
  });
  return plotlyLoaded;
}
function sortableTable(table) {
  const node = el("table", { class: "grid", "data-table": table.name });
  const head = el("tr", {}, el("th", {}, el("button", { type: "button" }, "method")));
  table.columns.forEach((c) => head.append(el("th", {}, el("button", { type: "button" }, c))));
  node.append(el("thead", {}, head));
  const body = el("tbody");
  const rows = table.rows.map((r) => el("tr", {}, el("td", {}, r.label + (r.flags ? " " + r.flags : "")), ...r.values.map((v) => el("td", { "data-v": v === null ? "" : v }, fmt(v)))));
  body.append(...rows);
  node.append(body);
  let sortCol = null, asc = true;
  head.querySelectorAll("button").forEach((button, col) => button.addEventListener("click", () => {
    asc = sortCol === col ? !asc : col === 0; sortCol = col;
    const key = (tr) => col === 0 ? tr.cells[0].textContent : (tr.cells[col].dataset.v === "" ? null : Number(tr.cells[col].dataset.v));
    const sorted = [...body.rows].sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === null) return 1; if (y === null) return -1;
      return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
    });
    body.append(...sorted);
  }));
  return node;
}
function exportBlock(name, text, filename) {
  const url = URL.createObjectURL(new Blob([text], { type: "text/plain" }));
  return el("details", {}, el("summary", {}, name + " ", el("a", { href: url, download: filename }, "download")), el("pre", {}, text));
}
async function loadResults() {
  const data = await getJSON("/api/results");
  const highlight = new URLSearchParams(location.search).get("report");
  $("results-error").textContent = data.error || "";
  const tables = $("tables"); tables.replaceChildren();
  const exports = $("exports"); exports.replaceChildren();
  for (const t of data.tables) {
    tables.append(el("h2", {}, t.title), sortableTable(t), ...t.notes.map((n) => el("p", { class: "note" }, n)));
    exports.append(el("h3", {}, t.name), exportBlock("Markdown", t.exports.md, "tables.md"),
      exportBlock("CSV", t.exports.csv, t.name + ".csv"), exportBlock("LaTeX", t.exports.tex, t.name + ".tex"));
  }
  if (data.markdown) exports.prepend(exportBlock("tables.md (all tables)", data.markdown, "tables.md"));
  renderReports(data.runs, highlight);
  renderCompare(data.runs, highlight);
  const drawn = renderCharts(data.charts);
  document.body.dataset.resultsReady = "1";
  performance.mark("fusionbench-tables-ready");
  if (!(await drawn)) return;
  performance.mark("fusionbench-charts-ready");
  document.body.dataset.chartsReady = "1";
}

// ---------- Results: charts ----------
// Each chart is an SVG image the server draws (matplotlib), requested with the tables: an image runs no script,
// and its text is text. "Interactive" draws the same chart with plotly.js (loaded then: 4.6 MB), for values on
// hover, zoom, and series hidden from the legend.
async function renderCharts(charts) {
  const figures = charts.map(chartFigure);
  $("bars").replaceChildren(...figures.filter((f, i) => charts[i].kind === "bars"));
  const sweeps = $("sweeps"); sweeps.replaceChildren();
  charts.forEach((c, i) => { if (c.kind === "lines") sweeps.append(el("h2", {}, c.heading), figures[i]); });
  try {
    await Promise.all(figures.map((f) => f.querySelector("img").decode()));
    return true;
  } catch {
    $("results-error").textContent = "a chart's image (/charts/...) did not load";
    return false;
  }
}
function chartFigure(chart) {
  const what = chart.kind === "bars" ? `${chart.ylabel} per task, one bar per row` : `${chart.ylabel} against ${chart.xlabel}, one curve per row`;
  const img = el("img", { src: chart.url, width: chart.width, height: chart.height, alt: what, "data-chart": chart.id });
  const button = el("button", { type: "button", title: "draw this chart with plotly.js: values on hover, zoom, series hidden from the legend" }, "Interactive");
  const figure = el("figure", { class: "chart", "data-chart": chart.id }, img, el("figcaption", {}, button));
  button.addEventListener("click", () => interactive(chart, figure, button));
  return figure;
}
async function interactive(chart, figure, button) {
  button.disabled = true;
  button.textContent = "loading plotly.js…";
  try { await loadPlotly(); } catch {
    $("results-error").textContent = "the charts' library /static/plotly.min.js did not load";
    button.disabled = false; button.textContent = "Interactive";
    return;
  }
  const plot = el("div", { class: "plot", style: `height: ${chart.height}px` });  // the image's height: nothing below moves
  figure.replaceChildren(plot);
  const traces = chart.series.map((s) => chart.kind === "bars"
    ? { type: "bar", name: plotText(s.label), x: chart.categories.map(plotText), y: s.values, marker: { color: s.color } }
    : { type: "scatter", mode: "lines+markers", name: plotText(s.label), x: chart.x, y: s.values, line: { color: s.color }, marker: { color: s.color } });
  const layout = { barmode: "group", margin: { t: 30 }, title: { text: plotText(chart.title) },
    xaxis: { title: { text: plotText(chart.xlabel) } }, yaxis: { title: { text: plotText(chart.ylabel) } } };
  window.Plotly.newPlot(plot, traces, layout, { displaylogo: false, responsive: true });
  figure.dataset.interactive = "1";
}
function renderReports(runs, highlight) {
  const table = $("reports");
  table.replaceChildren(el("tr", {}, ...["report", "method", "seed", "fusion_bench", "torch", "file"].map((h) => el("th", {}, h))));
  runs.forEach((run, i) => {
    const p = run.provenance;
    const file = run.file ? el("a", { href: "/files/" + run.file.split("/").map(encodeURIComponent).join("/") }, run.path) : run.path;
    const tr = el("tr", { class: run.path === highlight ? "highlight" : null },
      el("td", {}, el("a", { href: "#", onclick: (e) => { e.preventDefault(); provenance(run); } }, run.label)),
      el("td", {}, run.method), el("td", {}, p.seed ?? ""), el("td", {}, p.fusion_bench_version ?? ""), el("td", {}, p.torch_version ?? ""), el("td", {}, file));
    table.append(tr);
    if (run.path === highlight) { provenance(run); tr.scrollIntoView({ block: "center" }); }
  });
}
function provenance(run) {
  $("prov-title").textContent = run.label;
  $("provenance").textContent = JSON.stringify({ file: run.path, ...run.provenance, choices: run.choices, config: run.config }, null, 2);
}
function renderCompare(runs, highlight) {
  const a = $("cmp-a"), b = $("cmp-b");
  for (const s of [a, b]) { s.replaceChildren(...runs.map((r, i) => el("option", { value: i }, r.label))); s.onchange = () => compare(runs); }
  const hi = runs.findIndex((r) => r.path === highlight);
  if (runs.length > 1) { a.value = hi === 0 ? 1 : 0; b.value = hi >= 0 ? hi : 1; }
  compare(runs);
}
function compare(runs) {
  const table = $("compare");
  table.replaceChildren();
  const A = runs[$("cmp-a").value], B = runs[$("cmp-b").value];
  if (!A || !B) return;
  table.append(el("tr", {}, el("th", {}, "task"), el("th", {}, "A"), el("th", {}, "B"), el("th", {}, "B − A")));
  const tasks = [...new Set([...Object.keys(A.sections[""] || {}), ...Object.keys(B.sections[""] || {})])];
  const acc = (run, t) => run.sections[""]?.[t]?.accuracy;
  const avg = (run) => run.averages[""]?.accuracy;
  for (const [name, x, y] of [...tasks.map((t) => [t, acc(A, t), acc(B, t)]), ["average", avg(A), avg(B)]]) {
    const d = x !== undefined && y !== undefined ? (y - x) * 100 : null;
    table.append(el("tr", {}, el("td", {}, name), el("td", {}, fmt(x === undefined ? null : x * 100)), el("td", {}, fmt(y === undefined ? null : y * 100)),
      el("td", { class: d > 0 ? "pos" : d < 0 ? "neg" : null }, d === null ? "–" : (d > 0 ? "+" : "") + d.toFixed(1))));
  }
}

// ---------- start ----------
window.addEventListener("popstate", () => { state.overrides = readOverrides(); show(currentView(), false); });
document.addEventListener("DOMContentLoaded", () => {
  token();
  state.overrides = readOverrides();
  for (const v of ["compose", "run", "results"]) $("nav-" + v).addEventListener("click", (e) => { e.preventDefault(); show(v, true); });
  $("start-run").addEventListener("click", startRun);
  $("extra-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const [k, ...rest] = $("extra").value.split("=");
    if (k && rest.length) { setOverride(k.trim(), rest.join("=")); $("extra").value = ""; renderCompose(); }
  });
  show(currentView(), false);
});
