// The ctsearch page: plain JavaScript, talking only to the server that sent it (docs/serve.md).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem("ctsearch-token") || "",
  mode: "index",          // "index": a slice of the archive; "upload": a file sent by the user
  patients: [],
  exam: null,             // catalogue row of the chosen examination
  slices: [],             // [{slice_index, z_mm}] of the chosen examination
  file: null,             // the uploaded File
  fileSlices: 0,          // slices of the uploaded volume, once known
  query: null,            // query metadata of the last answer
  images: [],             // [{img, url(window) -> Promise<objectURL>}]: redrawn when the window changes
  generation: 0,          // answers of older searches are dropped
};

// ------------------------------------------------------------------ talking to the server

class HttpError extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (resp.status === 401) {
    $("auth").hidden = false;
    $("token").focus();
    throw new HttpError("This server needs an access token (enter it above).");
  }
  if (!resp.ok) {
    let text = resp.status + " " + resp.statusText;
    try { text = (await resp.json()).error || text; } catch (e) { /* not JSON */ }
    throw new HttpError(text);
  }
  return resp;
}

async function apiJSON(path, options) { return (await api(path, options)).json(); }

async function apiImage(path, options) {
  const blob = await (await api(path, options)).blob();
  return URL.createObjectURL(blob);
}

function showError(err) {
  const box = $("message");
  box.textContent = err instanceof Error ? err.message : String(err);
  box.hidden = false;
}

function clearError() { $("message").hidden = true; }

function toast(text) {
  const t = $("toast");
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 1800);
}

// ------------------------------------------------------------------ query parameters

function windowParam() {
  const choice = document.querySelector('input[name="window"]:checked').value;
  if (choice !== "custom") return choice;
  return $("window-level").value + "," + $("window-width").value;
}

function sliceIndex() {
  const v = Number($("slice").value);
  return state.mode === "index" ? (state.slices[v] || {}).slice_index : v;
}

// The query as URL parameters and request options: a row reference (GET) or the file (POST).
function queryRequest(extra) {
  const p = new URLSearchParams(extra || {});
  let options = {};
  if (state.mode === "index") {
    p.set("query", state.exam.volume_id + ":" + sliceIndex());
  } else {
    if (state.fileSlices) p.set("slice", String(sliceIndex()));  // else the server takes the middle slice
    options = { method: "POST", body: state.file, headers: { "Content-Type": "application/octet-stream" } };
  }
  return [p, options];
}

// ------------------------------------------------------------------ images that follow the window

function track(img, url) {
  state.images.push({ img, url });
  return draw(img, url);
}

async function draw(img, url) {
  try {
    const src = await url(windowParam());
    if (img.dataset.src) URL.revokeObjectURL(img.dataset.src);
    img.dataset.src = src;
    img.src = src;
  } catch (err) {
    img.alt = err.message;
  }
}

function redrawAll() {
  state.images = state.images.filter((x) => x.img.isConnected);
  state.images.forEach((x) => draw(x.img, x.url));
}

function thumbURL(volumeId, slice) {
  return (win) => apiImage("/api/thumbnail?" + new URLSearchParams({ volume_id: volumeId, slice: String(slice), window: win, size: "256" }));
}

function queryThumbURL() {
  return (win) => {
    const [p, options] = queryRequest({ window: win, size: "512" });
    return apiImage("/api/thumbnail?" + p, options);
  };
}

// ------------------------------------------------------------------ choosing the query

function fmtZ(z) { return (z === null || z === undefined) ? "?" : Number(z).toFixed(1) + " mm"; }
function shortId(id) { return !id ? "?" : id.length > 18 ? "…" + id.slice(-12) : id; }

async function loadInfo() {
  const info = await apiJSON("/api/info");
  $("index-info").textContent = `${info.slices.toLocaleString()} slices of ${info.volumes} examinations, ${info.patients} patients` +
    ` · model ${info.model} (${info.embedding_dim} dims) · ${info.shards.length} shards`;
}

async function loadPatients() {
  state.patients = await apiJSON("/api/patients");
  const sel = $("patient");
  sel.innerHTML = "";
  for (const p of state.patients) {
    const o = document.createElement("option");
    o.value = p.patient_id;
    o.textContent = `${p.patient_id || "(unknown)"} · ${p.exams.length} exam${p.exams.length === 1 ? "" : "s"}`;
    sel.appendChild(o);
  }
  if (state.patients.length) await choosePatient();
  else showError("The index holds no slices.");
}

async function choosePatient() {
  const p = state.patients.find((x) => x.patient_id === $("patient").value) || state.patients[0];
  const sel = $("exam");
  sel.innerHTML = "";
  p.exams.forEach((e, i) => {
    const o = document.createElement("option");
    o.value = String(i);
    o.textContent = `${e.exam_date || "date unknown"} · ${e.n_slices} slices · series ${shortId(e.series_id || e.volume_id)}`;
    sel.appendChild(o);
  });
  await chooseExam();
}

async function chooseExam() {
  const p = state.patients.find((x) => x.patient_id === $("patient").value) || state.patients[0];
  state.exam = p.exams[Number($("exam").value) || 0];
  const vol = await apiJSON("/api/volumes/" + encodeURIComponent(state.exam.volume_id));
  state.slices = vol.slices;
  const s = $("slice");
  s.min = "0";
  s.max = String(Math.max(0, state.slices.length - 1));
  s.value = String(Math.floor(state.slices.length / 2));
  queryChanged();
}

function sliceLabel() {
  if (state.mode === "index") {
    const s = state.slices[Number($("slice").value)] || {};
    return `slice ${s.slice_index} of ${state.slices.length} · z ${fmtZ(s.z_mm)}`;
  }
  if (!state.file) return "";
  const n = state.fileSlices ? ` of ${state.fileSlices}` : "";
  const z = state.query && state.query.upload ? ` · z ${fmtZ(state.query.z_mm)}` : "";
  return `slice ${$("slice").value}${n}${z}`;
}

let searchTimer = null;
function queryChanged() {
  $("slice-label").textContent = sliceLabel();
  if (state.mode === "index" && !state.exam) return;
  if (state.mode === "upload" && !state.file) return;
  clearTimeout(searchTimer);
  // Dragging the slider should not fire one search per pixel.
  searchTimer = setTimeout(search, 250);
}

function setMode(mode) {
  state.mode = mode;
  $("tab-index").classList.toggle("active", mode === "index");
  $("tab-upload").classList.toggle("active", mode === "upload");
  $("pick-index").hidden = mode !== "index";
  $("pick-upload").hidden = mode !== "upload";
  if (mode === "index" && state.exam) {
    const s = $("slice");
    s.max = String(Math.max(0, state.slices.length - 1));
    s.value = String(Math.floor(state.slices.length / 2));
  }
  if (mode === "upload") {
    $("slice").max = String(Math.max(0, state.fileSlices - 1));
  }
  queryChanged();
}

// ------------------------------------------------------------------ search, cross-exam, results

async function search() {
  const gen = ++state.generation;
  clearError();
  const extra = { k: $("k").value || "8" };
  if ($("one-per").value) extra.one_per = $("one-per").value;
  if ($("other-patients").checked) {
    const own = state.mode === "index" ? state.exam.patient_id : (state.query && state.query.upload ? state.query.patient_id : "");
    if (own) extra.exclude_patient = own;
  }
  $("results-note").textContent = "searching…";
  try {
    const [p, options] = queryRequest(extra);
    const [p2, options2] = queryRequest({ per_exam: "3" });
    const [res, cross] = await Promise.all([
      apiJSON("/api/search?" + p, options),
      apiJSON("/api/crossexam?" + p2, options2).catch((err) => ({ error: err.message })),
    ]);
    if (gen !== state.generation) return;
    state.query = res.query;
    if (state.mode === "upload") {
      state.fileSlices = res.query.n_slices;
      $("slice").max = String(Math.max(0, state.fileSlices - 1));
      $("slice").value = String(res.query.slice_index);
      $("slice-label").textContent = sliceLabel();
    }
    state.images = [];
    showQuery(res.query);
    showHits(res.hits);
    showCrossExam(cross);
    $("results-note").textContent = `${res.hits.length} found`;
  } catch (err) {
    if (gen !== state.generation) return;
    $("results-note").textContent = "";
    showError(err);
  }
}

function showQuery(q) {
  track($("query-image"), queryThumbURL());
  $("query-meta").textContent = q.upload
    ? `uploaded scan · patient ${q.patient_id || "unknown"} · slice ${q.slice_index} · z ${fmtZ(q.z_mm)}`
    : `patient ${q.patient_id} · ${q.exam_date || "date unknown"} · slice ${q.slice_index} · z ${fmtZ(q.z_mm)}`;
}

function el(tag, props, children) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  for (const c of children || []) e.append(c);
  return e;
}

function showHits(hits) {
  const box = $("results");
  box.innerHTML = "";
  if (!hits.length) box.append(el("p", { className: "empty", textContent: "No slices match these filters." }));
  for (const h of hits) {
    const img = el("img", { alt: `slice ${h.slice_index} of ${h.volume_id}` });
    const why = el("button", { type: "button", className: "explain", textContent: "Why similar?" });
    why.addEventListener("click", () => explain(h));
    const copy = el("button", { type: "button", className: "copy", textContent: "Copy IDs" });
    copy.addEventListener("click", () => copyIds(h));
    const card = el("div", { className: "hit" }, [
      img,
      el("div", {}, [el("span", { className: "score", textContent: `#${h.rank} · ${h.score.toFixed(3)}` })]),
      el("div", { className: "meta", textContent: `patient ${h.patient_id || "?"} · ${h.exam_date || "date unknown"}` }),
      el("div", { className: "meta", textContent: `slice ${h.slice_index} · z ${fmtZ(h.z_mm)}` }),
      el("div", { className: "row" }, [why, copy]),
    ]);
    card.dataset.volume = h.volume_id;
    card.dataset.slice = String(h.slice_index);
    box.append(card);
    track(img, thumbURL(h.volume_id, h.slice_index));
  }
}

function showCrossExam(res) {
  const box = $("crossexam");
  box.innerHTML = "";
  if (res.error) { box.append(el("p", { className: "empty", textContent: res.error })); return; }
  if (!res.exams.length) { box.append(el("p", { className: "empty", textContent: `${res.message || "The index holds no other examination of this patient"}.` })); return; }
  for (const e of res.exams) {
    const strip = el("div", { className: "strip" });
    for (const m of e.matches) {
      const img = el("img", { alt: `slice ${m.slice_index}` });
      const best = m.slice_index === e.best.slice_index;
      strip.append(el("figure", { className: best ? "best" : "" }, [img,
        el("figcaption", { textContent: `z ${fmtZ(m.z_mm)} · ${m.score.toFixed(3)}` })]));
      track(img, thumbURL(e.volume_id, m.slice_index));
    }
    box.append(el("div", { className: "exam" }, [
      el("div", { textContent: `${e.exam_date || "date unknown"} · series ${shortId(e.series_id || e.volume_id)} · best slice ${e.best.slice_index} at z ${fmtZ(e.best.z_mm)} · confidence ${e.confidence.toFixed(2)}${e.copies.length ? ` · also stored as ${e.copies.map(shortId).join(", ")}` : ""}` }),
      strip,
    ]));
  }
  if (res.copies_of_query && res.copies_of_query.length) {
    box.append(el("p", { className: "empty", textContent: `Not shown: ${res.copies_of_query.map(shortId).join(", ")}, a copy of the query's own scan (same pixels).` }));
  }
}

async function explain(hit) {
  const dlg = $("explain-dialog");
  const img = $("explain-image");
  if (img.dataset.src) URL.revokeObjectURL(img.dataset.src);
  img.removeAttribute("src");
  img.dataset.src = "";
  $("explain-status").textContent = `query vs. #${hit.rank} (patient ${hit.patient_id || "?"}, z ${fmtZ(hit.z_mm)}): computing RELAX, this takes a few seconds…`;
  if (!dlg.open) dlg.showModal();
  try {
    const [p, options] = queryRequest({ hit: hit.volume_id + ":" + hit.slice_index });
    const src = await apiImage("/api/explain?" + p, options);
    img.dataset.src = src;
    img.src = src;
    $("explain-status").textContent = `query vs. #${hit.rank} (patient ${hit.patient_id || "?"}, score ${hit.score.toFixed(3)})`;
  } catch (err) {
    $("explain-status").textContent = err.message;
  }
}

async function copyIds(h) {
  const text = [
    `patient_id: ${h.patient_id || ""}`, `study_id: ${h.study_id || ""}`, `series_id: ${h.series_id || ""}`,
    `volume_id: ${h.volume_id}`, `slice_index: ${h.slice_index}`, `z_mm: ${h.z_mm}`,
    `sop_instance_uid: ${h.sop_instance_uid || ""}`, `path: ${h.path || ""}`,
  ].join("\n");
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {
    // No clipboard API (e.g. plain http off localhost): the old way.
    const t = el("textarea", { value: text });
    document.body.append(t);
    t.select();
    document.execCommand("copy");
    t.remove();
  }
  toast("Identifiers copied");
}

// ------------------------------------------------------------------ wiring

async function start() {
  try {
    await loadInfo();
    $("auth").hidden = true;
    await loadPatients();
  } catch (err) {
    showError(err);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("auth").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("ctsearch-token", state.token);
    clearError();
    start();
  });
  $("patient").addEventListener("change", () => choosePatient().catch(showError));
  $("exam").addEventListener("change", () => chooseExam().catch(showError));
  $("slice").addEventListener("input", queryChanged);
  $("tab-index").addEventListener("click", () => setMode("index"));
  $("tab-upload").addEventListener("click", () => setMode("upload"));
  $("upload").addEventListener("change", () => {
    state.file = $("upload").files[0] || null;
    state.fileSlices = 0;
    state.query = null;
    $("slice").max = "0";   // the first answer says how many slices there are
    queryChanged();
  });
  for (const id of ["k", "other-patients", "one-per"]) $(id).addEventListener("change", queryChanged);
  $("search").addEventListener("click", search);
  document.querySelectorAll('input[name="window"]').forEach((r) => r.addEventListener("change", redrawAll));
  for (const id of ["window-level", "window-width"]) {
    $(id).addEventListener("change", () => { $("window-custom").checked = true; redrawAll(); });
  }
  start();
});
