// mlsae explorer front end: plain DOM code over the JSON API (see /docs). No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, prompt: null, token: null };

// ---- helpers ---------------------------------------------------------------------------------
async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(path, opts);
  let data;
  try {
    data = await res.json();
  } catch {
    data = { detail: `${res.status} ${res.statusText}` };
  }
  if (!res.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data));
  return data;
}

function showError(err) {
  const box = $("error");
  box.textContent = err ? err.message || String(err) : "";
  box.hidden = !err;
}

// Runs one user action: a status line while it works, the server's message if it fails.
async function run(what, action) {
  showError(null);
  $("status").textContent = what;
  try {
    await action();
  } catch (err) {
    showError(err);
  } finally {
    $("status").textContent = "";
  }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

const showText = (text) => text.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
const fmt = (x, digits = 3) => Number(x).toFixed(digits);
const pct = (x) => `${(100 * x).toFixed(2)}%`;
const signed = (x) => `${x >= 0 ? "+" : ""}${(100 * x).toFixed(2)}%`;

// Numbers go to the server as numbers; anything else is sent as typed, so the server's
// validation message explains what is wrong with it.
function numberOrText(text) {
  const t = text.trim();
  const n = Number(t);
  return t !== "" && Number.isFinite(n) ? n : text;
}

function currentPrompt() {
  const text = $("prompt").value;
  if (!text) throw new Error("Type a prompt first.");
  return text;
}

function setView(name) {
  for (const b of document.querySelectorAll("#tabs button")) {
    b.classList.toggle("active", b.dataset.view === name);
  }
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== `view-${name}`;
}

function addLayerOptions(select, layers) {
  for (const layer of layers) select.append(el("option", { value: layer }, `${layer}`));
}

// ---- run info --------------------------------------------------------------------------------
async function loadInfo() {
  const info = await api("GET", "/api/info");
  state.info = info;
  const layers = info.layers;
  $("run-info").textContent = `${info.run} · ${info.model} · ${info.n_latents} latents, ` +
    `k=${info.k} · layers ${layers[0]}..${layers[layers.length - 1]} (${layers.length})`;
  for (const id of ["latent-layer", "splice-layer", "steer-layer"]) addLayerOptions($(id), layers);
  $("steer-doc").textContent = `Steering: ${info.steering}.`;
}

// ---- Prompt view -----------------------------------------------------------------------------
async function analyse() {
  const prompt = currentPrompt();
  const data = await api("POST", "/api/prompt", { prompt, top_latents: 32 });
  state.prompt = prompt;
  state.token = null;
  renderTokens(data.tokens);
  renderHeatmap(data);
  $("token-title").textContent = "Token";
  $("token-detail").replaceChildren(el("p", { class: "muted" }, "Click a token above."));
  setView("prompt");
}

function renderTokens(tokens) {
  $("tokens").replaceChildren(...tokens.map((t) => el("span", {
    class: t.included ? "tok" : "tok excluded",
    "data-pos": t.position,
    title: `position ${t.position}, id ${t.id}` + (t.included ? "" : " (excluded from statistics)"),
    onclick: () => run("reading token…", () => selectToken(t.position)),
  }, showText(t.text))));
}

// Shade relative to the largest cell, so spread-out latents over many layers stay visible.
function heat(v, top) {
  return `background: rgba(37, 99, 235, ${(v / top).toFixed(3)})`;
}

function renderHeatmap(data) {
  const { latents, values, totals } = data.heatmap;
  if (!latents.length) {
    $("heatmap").replaceChildren(el("p", { class: "muted" }, "No latent is active at an included position."));
    return;
  }
  const top = Math.max(...values.flat(), 1e-12);
  const head = el("tr", {}, el("th", {}, "layer"), ...latents.map((f) => el("th", {},
    el("button", { type: "button", class: "latent-link", onclick: () => openLatent(f) }, `${f}`))));
  const rows = data.layers.map((layer, i) => el("tr", {}, el("th", {}, `${layer}`),
    ...latents.map((f, j) => el("td", {
      class: "cell",
      style: heat(values[i][j], top),
      title: `latent ${f}, layer ${layer}: ${pct(values[i][j])} of its activation (sum ${fmt(totals[i][j])})`,
      onclick: () => openLatent(f, layer),
    }))));
  $("heatmap").replaceChildren(el("table", { class: "heatmap" }, el("thead", {}, head), el("tbody", {}, ...rows)),
    el("p", { class: "help" }, `Darkest cell: ${pct(top)} of a latent's activation at one layer.`));
}

async function selectToken(position) {
  const data = await api("POST", "/api/token", { prompt: state.prompt, position, top: 8 });
  state.token = position;
  for (const t of document.querySelectorAll("#tokens .tok")) {
    t.classList.toggle("selected", Number(t.dataset.pos) === position);
  }
  const note = data.token.included ? "" : " (excluded from statistics: out of the training distribution)";
  $("token-title").textContent = `Token ${position}: “${showText(data.token.text)}”${note}`;
  const rows = data.layers.map((row) => el("tr", {}, el("th", {}, `layer ${row.layer}`),
    el("td", {}, ...(row.latents.length ? row.latents.map((v) => el("button", {
      type: "button", class: "chip", title: `latent ${v.latent} at layer ${row.layer}`,
      onclick: () => openLatent(v.latent, row.layer),
    }, `#${v.latent} `, el("span", { class: "val" }, fmt(v.activation)))) : [el("span", { class: "muted" }, "none active")]))));
  $("token-detail").replaceChildren(el("table", { class: "token-layers" }, el("tbody", {}, ...rows)));
}

// ---- Latent view -----------------------------------------------------------------------------
function openLatent(latent, layer) {
  setView("latent");
  $("latent-input").value = latent;
  $("latent-layer").value = layer === undefined ? "" : `${layer}`;
  return run("loading latent…", () => showLatent(latent, layer));
}

async function showLatent(latent, layer) {
  if (`${latent}`.trim() === "") throw new Error("Enter a latent number.");
  const query = layer === undefined || layer === "" ? "" : `?layer=${encodeURIComponent(layer)}`;
  const data = await api("GET", `/api/latents/${encodeURIComponent(latent)}${query}`);
  $("latent-title").textContent = `Latent ${data.latent}`;
  $("steer-latent").value = data.latent;
  if (data.examples.layer !== null) $("steer-layer").value = `${data.examples.layer}`;
  renderDistribution(data.distribution);
  renderExamples(data.examples);
  renderLogitEffect(data.logit_effect);
  renderDensity(data.density);
  renderByLayer(data.examples_by_layer, data.examples);
}

function renderLogitEffect(le) {
  if (!le || !le.available) {
    $("latent-logits").replaceChildren(el("p", { class: "hint" }, le ? le.hint : "unavailable"));
    return;
  }
  const table = (title, rows, cls) => el("table", { class: "logit-table" }, el("caption", {}, title),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, el("td", {}, showText(r.text)),
      el("td", { class: cls }, `${r.value >= 0 ? "+" : ""}${fmt(r.value, 2)}`)))));
  $("latent-logits").replaceChildren(el("p", { class: "help" },
    "W_dec[latent] through the final norm and the unembedding: the next tokens it promotes and suppresses."),
  el("div", { class: "cols" }, table("promotes", le.top, "up"), table("suppresses", le.bottom, "down")));
}

function renderDensity(d) {
  if (!d || !d.available) {
    $("latent-density").replaceChildren(el("p", { class: "hint" }, d ? d.hint : "unavailable"));
    return;
  }
  const edges = d.bin_edges;
  const rows = d.layers.map((layer, i) => {
    const n = d.counts[i].reduce((a, b) => a + b, 0);
    const top = Math.max(...d.counts[i], 1);
    return el("div", { class: "density-row" }, el("span", {}, `layer ${layer}`),
      el("div", { class: "density-bins" }, ...d.counts[i].map((c, b) => el("div", {
        class: "density-bin", style: `height: ${(100 * c / top).toFixed(1)}%`,
        title: `layer ${layer}: ${c} activations in [${fmt(edges[b])}, ${fmt(edges[b + 1])})`,
      }))), el("span", { class: "muted" }, `${n} nonzero`));
  });
  const over = d.included_tokens ? ` over ${d.included_tokens} tokens` : "";
  $("latent-density").replaceChildren(el("p", { class: "help" },
    `Histogram of the latent's nonzero activations at each layer${over}; bins log-spaced ` +
    `from ${fmt(edges[0])} to ${fmt(edges[edges.length - 1])}, each row scaled to its own tallest bin.`), ...rows);
}

function renderByLayer(groups, ex) {
  if (!ex.available) {
    $("latent-by-layer").replaceChildren(el("p", { class: "hint" }, ex.hint));
    return;
  }
  if (!groups.length) {
    $("latent-by-layer").replaceChildren(el("p", { class: "muted" }, "The latent never fired in the streamed text."));
    return;
  }
  const scale = Math.max(...groups.flatMap((g) => g.examples.map((e) => e.activation)), 1e-12);
  $("latent-by-layer").replaceChildren(...groups.flatMap((g) => g.examples.map((e) => el("div", { class: "example" },
    el("span", { class: "meta" }, `layer ${g.layer} · #${e.rank} act ${fmt(e.activation)}`),
    ...e.tokens.map((text, i) => el("span", {
      class: i === e.max_index ? "ctx-tok max" : "ctx-tok",
      style: `background: rgba(234, 88, 12, ${Math.min(e.acts[i] / scale, 1).toFixed(3)})`,
      title: `activation ${fmt(e.acts[i])}`,
    }, showText(text)))))));
}

function renderDistribution(d) {
  if (!d.available) {
    $("latent-dist").replaceChildren(el("p", { class: "hint" }, d.hint));
    return;
  }
  const top = Math.max(...d.probs, 1e-12);
  const rows = d.layers.map((layer, i) => el("div", { class: "bar-row" },
    el("span", {}, `layer ${layer}`),
    el("div", { class: "bar-track" }, el("div", { class: "bar", style: `width: ${(100 * d.probs[i] / top).toFixed(1)}%` })),
    el("span", { class: "muted" }, `${pct(d.probs[i])} · fired on ${d.counts[i]} tokens`)));
  const over = d.included_tokens ? ` over ${d.included_tokens} tokens` : "";
  $("latent-dist").replaceChildren(el("p", { class: "help" },
    `Share of the latent's summed activation at each layer${over}.`), ...rows);
}

function renderExamples(ex) {
  if (!ex.available) {
    $("examples-title").textContent = "Max-activating examples";
    $("latent-examples").replaceChildren(el("p", { class: "hint" }, ex.hint));
    return;
  }
  $("examples-title").textContent = `Max-activating examples at layer ${ex.layer}`;
  $("latent-layer").value = `${ex.layer}`;
  if (!ex.examples.length) {
    $("latent-examples").replaceChildren(el("p", { class: "muted" },
      `No example at layer ${ex.layer}: the latent never fired there in the streamed text.`));
    return;
  }
  const scale = Math.max(...ex.examples.map((e) => e.activation), 1e-12);
  $("latent-examples").replaceChildren(...ex.examples.map((e) => el("div", { class: "example" },
    el("span", { class: "meta" }, `#${e.rank} act ${fmt(e.activation)}`),
    ...e.tokens.map((text, i) => el("span", {
      class: i === e.max_index ? "ctx-tok max" : "ctx-tok",
      style: `background: rgba(234, 88, 12, ${Math.min(e.acts[i] / scale, 1).toFixed(3)})`,
      title: `activation ${fmt(e.acts[i])}`,
    }, showText(text))))));
}

// ---- Logits view -----------------------------------------------------------------------------
function probTable(title, rows) {
  return el("table", { class: "logit-table" }, el("caption", {}, title),
    el("thead", {}, el("tr", {}, el("th", {}, "token"), el("th", {}, "prob"))),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, el("td", {}, showText(r.text)), el("td", {}, pct(r.prob))))));
}

function changeTable(title, rows) {
  return el("table", { class: "logit-table" }, el("caption", {}, title),
    el("thead", {}, el("tr", {}, ...["token", "prob", "clean", "change"].map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, el("td", {}, showText(r.text)),
      el("td", {}, pct(r.prob)), el("td", {}, pct(r.clean_prob)),
      el("td", { class: r.delta >= 0 ? "up" : "down" }, signed(r.delta))))));
}

async function predict() {
  const layer = $("splice-layer").value;
  const data = await api("POST", "/api/logits", {
    prompt: currentPrompt(), layer: layer === "" ? null : Number(layer), top: 10,
  });
  $("logits-clean").replaceChildren(probTable("Clean", data.clean));
  $("logits-spliced").replaceChildren(data.spliced
    ? changeTable(`SAE reconstruction at layer ${data.spliced.layer} (KL ${fmt(data.spliced.kl, 4)})`, data.spliced.top)
    : el("p", { class: "muted" }, "Pick a layer to splice in the SAE reconstruction."));
}

async function steer() {
  const data = await api("POST", "/api/steer", {
    prompt: currentPrompt(),
    latent: numberOrText($("steer-latent").value),
    layer: Number($("steer-layer").value),
    factor: numberOrText($("steer-factor").value),
    top: 10,
  });
  const s = data.steered;
  $("steer-summary").textContent = `Latent ${data.latent} × ${data.factor} at layer ${s.layer}: ` +
    `the added vector is ${fmt(data.relative_norm, 2)}× the residual norm on average; KL ${fmt(s.kl, 4)}.`;
  $("steer-clean").replaceChildren(probTable("Clean", data.clean));
  $("steer-top").replaceChildren(changeTable("Steered", s.top));
  $("steer-increased").replaceChildren(changeTable("Most increased", s.increased));
  $("steer-decreased").replaceChildren(changeTable("Most decreased", s.decreased));
}

// ---- Graph view ------------------------------------------------------------------------------
const SVG_NS = "http://www.w3.org/2000/svg";
const KIND_COLOURS = { latent: "#2563eb", error: "#9ca3af", mlp: "#16a34a", embedding: "#111827", logit: "#ea580c" };
const graphState = { data: null, pinned: new Set(), byId: new Map() };

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

async function buildGraph() {
  const target = $("graph-target").value;
  const data = await api("POST", "/api/graph", {
    prompt: currentPrompt(), target: target === "" ? null : target,
    mode: $("graph-mode").value, node_threshold: numberOrText($("graph-node-threshold").value),
  });
  graphState.data = data;
  graphState.pinned = new Set();
  renderGraph(data);
  renderPinned();
  $("graph-result").replaceChildren();
}

// Token x layer layout: x = token position, y = layer (embeddings at the bottom, target on
// top); nodes sharing a cell spread sideways.
function layoutGraph(data) {
  const meta = data.metadata;
  const rows = ["E", ...meta.mlsae.layers.map(String), String(meta.mlsae.n_blocks + 1)];
  const mlpRows = new Set(data.nodes.filter((n) => n.mlsae.kind === "mlp").map((n) => n.layer));
  // MLP nodes of a block sit on that block's own row when it is a spliced layer
  for (const r of mlpRows) if (!rows.includes(r)) rows.splice(rows.length - 1, 0, r);
  rows.sort((a, b) => (a === "E" ? -1 : b === "E" ? 1 : Number(a) - Number(b)));
  const T = meta.prompt_tokens.length;
  const colW = Math.max(48, Math.min(90, 1100 / T));
  const rowH = Math.max(14, Math.min(40, 700 / rows.length));
  const left = 40, top = 16;
  const width = left + colW * T + 10, height = top + rowH * rows.length + 60;
  const cells = new Map();
  for (const n of data.nodes) {
    const key = `${n.layer}|${n.ctx_idx}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const maxInfl = Math.max(...data.nodes.map((n) => Math.abs(n.mlsae.influence || 0)), 1e-12);
  const pos = new Map();
  for (const group of cells.values()) {
    group.sort((a, b) => (b.mlsae.influence || 0) - (a.mlsae.influence || 0));
    // a cell's nodes in a small grid, most influential first (centre-left, top)
    const per = Math.max(1, Math.floor((colW - 6) / 8));
    const nrow = Math.ceil(group.length / per);
    const dy = Math.min(6, (rowH - 4) / Math.max(nrow, 1));
    group.forEach((n, i) => {
      const r = rows.indexOf(n.layer);
      const ix = i % per, iy = Math.floor(i / per);
      const inRow = Math.min(per, group.length - iy * per);
      const x = left + colW * (n.ctx_idx + 0.5) + (ix - (inRow - 1) / 2) * 8;
      const y = top + rowH * (rows.length - 1 - r + 0.5) + (iy - (nrow - 1) / 2) * dy;
      const rad = n.mlsae.kind === "logit" ? 7 : 1.5 + 5 * Math.sqrt(Math.abs(n.mlsae.influence || 0) / maxInfl);
      pos.set(n.node_id, { x, y, r: rad });
    });
  }
  return { rows, T, colW, rowH, left, top, width, height, pos };
}

function renderGraph(data) {
  const meta = data.metadata;
  const m = meta.mlsae;
  graphState.byId = new Map(data.nodes.map((n) => [n.node_id, n]));
  $("graph-summary").textContent = `${m.mode} graph of “${showText(m.target.token_str)}” ` +
    `(p=${fmt(m.target.probability)}): ${m.pruned_graph.nodes} nodes (${m.pruned_graph.latents} latents), ` +
    `${m.pruned_graph.links} links after pruning; full graph ${m.full_graph.nodes} nodes, ` +
    `${m.full_graph.edges} edges; built in ${fmt(m.timing.total_s, 1)} s.`;
  const L = layoutGraph(data);
  const root = svg("svg", { width: L.width, height: L.height, viewBox: `0 0 ${L.width} ${L.height}` });
  L.rows.forEach((r, i) => {
    const y = L.top + L.rowH * (L.rows.length - 1 - i + 0.5);
    const label = r === "E" ? "emb" : r === String(m.n_blocks + 1) ? "target" : r;
    const t = svg("text", { x: 2, y: y + 3, class: "axis" });
    t.textContent = label;
    root.append(t);
  });
  meta.prompt_tokens.forEach((tok, i) => {
    const t = svg("text", { x: L.left + L.colW * i + 2, y: L.height - 30, class: "axis" });
    t.textContent = showText(tok).slice(0, 10);
    root.append(t);
  });
  const maxW = Math.max(...data.links.map((l) => Math.abs(l.weight)), 1e-12);
  const links = [...data.links].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 3000);
  const gl = svg("g");
  for (const l of links.reverse()) {
    const a = L.pos.get(l.source), b = L.pos.get(l.target);
    if (!a || !b) continue;
    const w = Math.abs(l.weight) / maxW;
    gl.append(svg("line", {
      x1: a.x, y1: a.y, x2: b.x, y2: b.y, class: "glink", "data-source": l.source, "data-target": l.target,
      stroke: l.weight >= 0 ? "#2563eb" : "#dc2626", "stroke-width": (0.3 + 2.5 * w).toFixed(2),
      "stroke-opacity": (0.15 + 0.6 * w).toFixed(2),
    }));
  }
  root.append(gl);
  const gn = svg("g");
  for (const n of data.nodes) {
    const p = L.pos.get(n.node_id);
    const c = svg("circle", {
      cx: p.x, cy: p.y, r: p.r.toFixed(2), fill: KIND_COLOURS[n.mlsae.kind] || "#666",
      class: "gnode", "data-id": n.node_id, "data-kind": n.mlsae.kind,
    });
    c.addEventListener("mouseenter", () => hoverNode(n));
    c.addEventListener("click", () => togglePin(n));
    gn.append(c);
  }
  root.append(gn);
  $("graph-svg").replaceChildren(root);
  $("graph-svg").classList.remove("focus");
}

let hoverSeq = 0;
async function hoverNode(n) {
  const seq = ++hoverSeq;
  const tok = graphState.data.metadata.prompt_tokens[n.ctx_idx];
  const head = el("p", {}, el("strong", {}, n.mlsae.kind === "latent" ? `Latent ${n.feature}` : n.clerp || n.mlsae.kind),
    ` · layer ${n.layer} · token ${n.ctx_idx} “${showText(tok)}” · activation ${n.activation === null ? "–" : fmt(n.activation)}` +
    ` · influence ${fmt(n.mlsae.influence, 4)} (cumulative ${fmt(n.influence)})`);
  $("graph-hover").replaceChildren(head);
  if (n.mlsae.kind !== "latent") return;
  const data = await api("GET", `/api/latents/${n.feature}?layer=${encodeURIComponent(n.layer)}&limit=3`);
  if (seq !== hoverSeq) return; // the pointer moved on
  const parts = [head];
  const d = data.distribution;
  if (d.available) {
    const top = Math.max(...d.probs, 1e-12);
    parts.push(el("p", { class: "help" }, "Share of its activation per layer over the dataset:"),
      el("div", { class: "mini-bars" }, ...d.layers.map((layer, i) => el("span", {
        class: "mini-bar", title: `layer ${layer}: ${pct(d.probs[i])}`,
        style: `height: ${(2 + 30 * d.probs[i] / top).toFixed(1)}px; background: ${String(layer) === n.layer ? "#ea580c" : "#2563eb"}`,
      }))));
  } else parts.push(el("p", { class: "hint" }, d.hint));
  const dens = data.density;
  if (dens && dens.available) {
    const i = dens.layers.map(String).indexOf(n.layer);
    if (i >= 0) parts.push(el("p", { class: "help" }, `Density at layer ${n.layer}: ` +
      `${dens.counts[i].reduce((a, b) => a + b, 0)} nonzero activations over ${dens.included_tokens} tokens.`));
  }
  const ex = data.examples;
  if (ex.available) {
    parts.push(el("p", { class: "help" }, `Top examples at layer ${ex.layer}:`),
      ...ex.examples.map((e) => el("div", { class: "example" },
        el("span", { class: "meta" }, `act ${fmt(e.activation)}`),
        ...e.tokens.map((text, i) => el("span", { class: i === e.max_index ? "ctx-tok max" : "ctx-tok" }, showText(text))))));
  } else parts.push(el("p", { class: "hint" }, ex.hint));
  $("graph-hover").replaceChildren(...parts);
}

function togglePin(n) {
  if (graphState.pinned.has(n.node_id)) graphState.pinned.delete(n.node_id);
  else graphState.pinned.add(n.node_id);
  const pinned = graphState.pinned;
  const hot = new Set(pinned);
  for (const line of document.querySelectorAll("#graph-svg .glink")) {
    const on = pinned.has(line.dataset.source) || pinned.has(line.dataset.target);
    line.classList.toggle("hot", on);
    if (on) { hot.add(line.dataset.source); hot.add(line.dataset.target); }
  }
  for (const c of document.querySelectorAll("#graph-svg .gnode")) {
    c.classList.toggle("pinned", pinned.has(c.dataset.id));
    c.classList.toggle("hot", hot.has(c.dataset.id));
  }
  $("graph-svg").classList.toggle("focus", pinned.size > 0);
  renderPinned();
}

function pinnedLatents() {
  // one edit per (latent, layer): spliced scales a latent at every position of its layer
  const seen = new Map();
  for (const id of graphState.pinned) {
    const n = graphState.byId.get(id);
    if (n && n.mlsae.kind === "latent") seen.set(`${n.feature}@${n.layer}`, n);
  }
  return [...seen.values()];
}

function renderPinned() {
  const nodes = pinnedLatents();
  $("graph-pinned").replaceChildren(...(nodes.length ? nodes.map((n) => el("div", { class: "edit" },
    `latent ${n.feature} at layer ${n.layer} × `,
    el("input", { type: "text", size: 5, value: "0", "data-latent": n.feature, "data-layer": n.layer, class: "edit-scale" }))) :
    [el("p", { class: "muted" }, "Click latents in the graph to pin them.")]));
}

async function intervene() {
  const edits = [...document.querySelectorAll("#graph-pinned .edit-scale")].map((inp) => ({
    latent: Number(inp.dataset.latent), layer: Number(inp.dataset.layer), scale: numberOrText(inp.value),
  }));
  if (!edits.length) throw new Error("Pin a latent in the graph first.");
  const data = await api("POST", "/api/intervene", { prompt: currentPrompt(), edits, top: 10 });
  $("graph-result").replaceChildren(el("p", { class: "muted" }, `KL(clean || edited) ${fmt(data.kl, 4)}`),
    el("div", { class: "cols" }, probTable("Clean", data.clean), changeTable("Edited", data.top)));
}

// ---- wiring ----------------------------------------------------------------------------------
function onSubmit(id, what, action) {
  $(id).addEventListener("submit", (event) => {
    event.preventDefault();
    run(what, action);
  });
}

onSubmit("prompt-form", "analysing…", analyse);
onSubmit("latent-form", "loading latent…",
  () => showLatent($("latent-input").value, $("latent-layer").value));
onSubmit("logits-form", "predicting…", predict);
onSubmit("steer-form", "steering…", steer);
onSubmit("graph-form", "building the graph…", buildGraph);
$("graph-apply").addEventListener("click", () => run("intervening…", intervene));
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("prompt-form").requestSubmit();
});
for (const b of document.querySelectorAll("#tabs button")) {
  b.addEventListener("click", () => setView(b.dataset.view));
}
run("loading run…", loadInfo);
