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
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("prompt-form").requestSubmit();
});
for (const b of document.querySelectorAll("#tabs button")) {
  b.addEventListener("click", () => setView(b.dataset.view));
}
run("loading run…", loadInfo);
