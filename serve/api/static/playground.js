// Darkroom's playground: one page over the public API, no build step.
// A generation is an async job (POST /v1/images/jobs) whose event stream
// (GET /v1/images/jobs/{id}/events, read with fetch so an API key can ride along) carries
// progress, partial images and the final images; Cancel is DELETE on the job.
"use strict";

const ROOT = (window.DARKROOM_ROOT || "").replace(/\/$/, "");
const ASPECTS = [["1:1", 1, 1], ["4:3", 4, 3], ["3:4", 3, 4], ["16:9", 16, 9], ["9:16", 9, 16]];
const PARTIAL_IMAGES = 3;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const $ = (id) => document.getElementById(id);

const state = { model: null, size: null, job: null, key: localStorage.getItem("darkroom-key") || "" };

function headers(extra = {}) {
  const h = { ...extra };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

function api(path, options = {}) {
  return fetch(`${ROOT}/${path}`, { ...options, headers: headers(options.headers || {}) });
}

// --- errors next to the field they name (error.param) -------------------------------------------
function clearErrors() {
  document.querySelectorAll(".field").forEach((f) => f.classList.remove("invalid"));
  document.querySelectorAll(".field-error").forEach((e) => { e.textContent = ""; });
  $("error").textContent = "";
}

function showError(error) {
  const message = (error && error.message) || String(error);
  const field = error && error.param ? document.querySelector(`[data-param="${CSS.escape(error.param)}"]`) : null;
  if (field && !field.hidden) {
    field.classList.add("invalid");
    field.querySelector(".field-error").textContent = message;
  } else {
    $("error").textContent = error && error.param ? `${error.param}: ${message}` : message;
  }
}

// --- the model: sizes, schedulers, adapters -------------------------------------------------------
function snap(value, multiple) {
  return Math.max(multiple, Math.round(value / multiple) * multiple);
}

function sizeFor(a, b) {
  const [w, h] = state.model.native_size.split("x").map(Number);
  const m = state.model.size_multiple || 8;
  const width = Math.sqrt((w * h * a) / b);  // the native size's area at this aspect ratio
  return `${snap(width, m)}x${snap((width * b) / a, m)}`;
}

function pickSize(size) {
  state.size = size;
  $("size-label").textContent = size;
  document.querySelectorAll("#aspects button").forEach((b) => {
    b.setAttribute("aria-checked", String(b.dataset.size === size));
  });
}

function buildAspects() {
  const box = $("aspects");
  box.textContent = "";
  for (const [label, a, b] of ASPECTS) {
    const button = document.createElement("button");
    button.type = "button";
    button.setAttribute("role", "radio");
    button.dataset.size = sizeFor(a, b);
    button.textContent = label;
    button.title = button.dataset.size;
    button.addEventListener("click", () => pickSize(button.dataset.size));
    box.append(button);
  }
  pickSize(sizeFor(1, 1));
}

async function loadLoras() {
  let list = [];
  try {
    const r = await api("v1/loras");
    if (r.ok) list = ((await r.json()).data || []);
  } catch (e) { /* no adapters endpoint: no picker */ }
  $("loras").hidden = list.length === 0;
  const box = $("lora-list");
  box.textContent = "";
  for (const item of list) {
    const name = item.name || item.id;
    const row = document.createElement("label");
    row.className = "check";
    row.innerHTML = `<input type="checkbox" data-lora> <span></span> <input type="number" step="0.05" value="1" data-scale title="scale">`;
    row.querySelector("span").textContent = name;
    row.querySelector("[data-lora]").value = name;
    box.append(row);
  }
}

async function init() {
  clearErrors();
  const r = await api("v1/models");
  if (r.status === 401) {
    $("key-field").hidden = false;
    showError({ message: "this server needs an API key", param: "api_key" });
    return;
  }
  if (!r.ok) { showError((await r.json()).error); return; }
  state.model = (await r.json()).data[0];
  $("model").textContent = `${state.model.id} (${state.model.family}, native ${state.model.native_size})`;
  const select = $("scheduler");
  select.length = 1;
  for (const name of state.model.schedulers || []) select.add(new Option(name, name));
  buildAspects();
  await loadLoras();
  $("generate").disabled = false;
}

// --- a request from the form, and back ------------------------------------------------------------
function numberOf(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function formBody() {
  const body = { prompt: $("prompt").value, size: state.size, n: numberOf("n") || 1 };
  const negative = $("negative_prompt").value.trim();
  if (negative) body.negative_prompt = negative;
  for (const id of ["num_inference_steps", "guidance_scale"]) {
    const v = numberOf(id);
    if (v !== null) body[id] = v;
  }
  if ($("scheduler").value) body.scheduler = $("scheduler").value;
  if ($("seed-lock").checked && numberOf("seed") !== null) body.seed = numberOf("seed");
  const loras = [...document.querySelectorAll("[data-lora]:checked")].map((box) => ({
    name: box.value, scale: Number(box.parentElement.querySelector("[data-scale]").value || 1),
  }));
  if (loras.length) body.loras = loras;
  return body;
}

function fillForm(body) {
  $("prompt").value = body.prompt || "";
  $("negative_prompt").value = body.negative_prompt || "";
  $("n").value = body.n || 1;
  $("num_inference_steps").value = body.num_inference_steps ?? "";
  $("guidance_scale").value = body.guidance_scale ?? "";
  $("scheduler").value = body.scheduler || "";
  $("seed").value = body.seed ?? "";
  $("seed-lock").checked = body.seed !== undefined;
  if (body.size) pickSize(body.size);
  document.querySelectorAll("[data-lora]").forEach((box) => {
    const hit = (body.loras || []).find((l) => l.name === box.value);
    box.checked = Boolean(hit);
    if (hit) box.parentElement.querySelector("[data-scale]").value = hit.scale;
  });
}

// --- one generation: submit a job, follow its events ----------------------------------------------
function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").hidden = !busy;
}

function previewSlot(index) {
  let img = document.querySelector(`#previews img[data-index="${index}"]`);
  if (!img) {
    img = document.createElement("img");
    img.dataset.index = index;
    img.alt = `image ${index}`;
    $("previews").append(img);
  }
  return img;
}

async function generate(body) {
  clearErrors();
  setBusy(true);
  $("previews").textContent = "";
  $("progress").value = 0;
  $("status").textContent = "Submitting…";
  const r = await api("v1/images/jobs", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, partial_images: PARTIAL_IMAGES }),
  });
  const job = await r.json();
  if (!r.ok) {
    setBusy(false);
    $("status").textContent = "Refused.";
    showError(job.error);
    return;
  }
  state.job = job.id;
  if (!$("seed-lock").checked) $("seed").value = job.seed;  // the seed the server picked
  const run = { body: { ...body, seed: job.seed }, images: [], job: job.id };
  try {
    await follow(job.id, run);
  } catch (e) {
    showError({ message: `lost the event stream: ${e}` });
  }
  state.job = null;
  setBusy(false);
}

async function follow(jobId, run) {
  const r = await api(`v1/images/jobs/${jobId}/events`, { headers: { Accept: "text/event-stream" } });
  if (!r.ok) { showError((await r.json()).error); return; }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trim());
      }
      if (data.length && onEvent(name, JSON.parse(data.join("\n")), run)) {
        reader.cancel();
        return;
      }
    }
  }
}

function dataUrl(event) {
  return `data:image/${event.output_format};base64,${event.b64_json}`;
}

// Returns true when the job has ended.
function onEvent(name, event, run) {
  if (name === "job.progress") {
    const { step, total_steps: total } = event.progress;
    $("progress").max = total;
    $("progress").value = step;
    $("status").textContent = `${event.status}: step ${step} of ${total}`;
  } else if (name === "image_generation.partial_image") {
    const img = previewSlot(event.image_index);
    img.className = "partial";
    img.src = dataUrl(event);
    img.dataset.partial = event.partial_image_index;
  } else if (name === "image_generation.completed") {
    const img = previewSlot(event.image_index);
    img.className = "final";
    img.src = dataUrl(event);
    run.images[event.image_index] = img.src;
  } else if (name === "job.status") {
    if (event.status === "queued" || event.status === "running") {
      $("status").textContent = event.status === "queued" ? "Queued…" : "Developing…";
      return false;
    }
    if (event.status === "succeeded") {
      $("progress").value = $("progress").max;
      $("status").textContent = `Done in ${Math.round((event.timings || {}).total || 0)} ms.`;
      addToGallery(run);
    } else if (event.status === "cancelled") {
      $("status").textContent = "Cancelled.";
    } else {
      $("status").textContent = "Failed.";
      showError(event.error);
    }
    return TERMINAL.has(event.status);
  } else if (name === "error") {
    showError(event.error);
  }
  return false;
}

// --- the gallery: each result with its settings, reproducible and copyable --------------------------
function curlOf(body) {
  const auth = state.key ? " \\\n  -H 'Authorization: Bearer $DARKROOM_API_KEY'" : "";
  const json = JSON.stringify({ ...body, response_format: "b64_json" }).replace(/'/g, "'\\''");
  return `curl -s ${location.origin}${ROOT}/v1/images/generations \\\n  -H 'Content-Type: application/json'${auth} \\\n  -d '${json}'`;
}

function pythonOf(body) {
  const { prompt, n, size, ...extra } = body;
  const key = state.key ? 'os.environ["DARKROOM_API_KEY"]' : '"unused"';
  return [
    "import base64, os",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${location.origin}${ROOT}/v1", api_key=${key})`,
    "result = client.images.generate(",
    `    model=${JSON.stringify(state.model.id)},`,
    `    prompt=${JSON.stringify(prompt)},`,
    `    n=${n || 1},`,
    `    size=${JSON.stringify(size)},`,
    '    response_format="b64_json",',
    `    extra_body=${JSON.stringify(extra)},`,
    ")",
    "for i, image in enumerate(result.data):",
    '    open(f"image-{i}.png", "wb").write(base64.b64decode(image.b64_json))',
  ].join("\n");
}

async function copy(text, pre) {
  pre.hidden = false;
  pre.textContent = text;
  try { await navigator.clipboard.writeText(text); } catch (e) { /* shown below instead */ }
}

function addToGallery(run) {
  const card = document.createElement("article");
  card.className = "card";
  card.dataset.body = JSON.stringify(run.body);
  card.dataset.job = run.job;
  const images = document.createElement("div");
  images.className = "images";
  for (const src of run.images) {
    const img = document.createElement("img");
    img.src = src;
    img.alt = run.body.prompt;
    images.append(img);
  }
  const info = document.createElement("div");
  info.className = "info";
  const dl = document.createElement("dl");
  for (const [k, v] of Object.entries(run.body)) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = typeof v === "object" ? JSON.stringify(v) : String(v);
    dl.append(dt, dd);
  }
  const tools = document.createElement("div");
  tools.className = "tools";
  const pre = document.createElement("pre");
  pre.hidden = true;
  for (const [label, action] of [
    ["Reproduce", () => { fillForm(run.body); generate(run.body); }],
    ["Copy curl", () => copy(curlOf(run.body), pre)],
    ["Copy Python", () => copy(pythonOf(run.body), pre)],
  ]) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.dataset.action = label.toLowerCase().replace(" ", "-");
    button.addEventListener("click", action);
    tools.append(button);
  }
  info.append(dl, tools, pre);
  card.append(images, info);
  $("gallery").prepend(card);
}

// --- wiring ---------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("generate").disabled = true;
  $("api-key").value = state.key;
  $("api-key").addEventListener("change", () => {
    state.key = $("api-key").value.trim();
    localStorage.setItem("darkroom-key", state.key);
    init();
  });
  $("form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (!state.job) generate(formBody());
  });
  $("cancel").addEventListener("click", () => {
    if (state.job) api(`v1/images/jobs/${state.job}`, { method: "DELETE" });
  });
  init().catch((e) => showError({ message: String(e) }));
});
