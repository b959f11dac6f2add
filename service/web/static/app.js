// The review page: classify images, correct answers, review what the model was unsure of (the
// review queue), see and forget feedback, watch the memory.
// Talks to the same API as any client; every failure becomes a sentence on the page.
"use strict";

const TOKEN_KEY = "review-token";
const FEEDBACK_PAGE = 12;
const $ = (sel, root = document) => root.querySelector(sel);

// ---- API ---------------------------------------------------------------------------------

const STATUS_WORDS = {
  400: "Bad request", 401: "Token needed", 403: "Token refused", 404: "Not found", 405: "Not available", 410: "Gone",
  408: "Too slow", 413: "Too large", 415: "Unsupported file", 422: "Refused", 500: "Server error",
  503: "Not ready", 507: "Not stored",
};

class ApiProblem extends Error {
  constructor(status, code, detail) {
    const what = STATUS_WORDS[status] || (status ? `HTTP ${status}` : "No answer");
    super(`${what}: ${detail}` + (status ? ` (HTTP ${status}, ${code})` : ""));
    this.status = status;
    this.code = code;
  }
}

// The API's errors are {"error": code, "detail": ...}; detail may be a sentence or a list of
// validation errors. Turn either into words, never raw JSON.
function describe(detail) {
  if (detail == null) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((e) => {
      if (e && typeof e === "object") {
        const where = (e.loc || []).filter((p) => p !== "body").join(".");
        return where ? `${where}: ${e.msg || "invalid"}` : (e.msg || "invalid");
      }
      return String(e);
    }).join("; ");
  }
  if (typeof detail === "object") {
    return Object.entries(detail).map(([k, v]) => `${k}: ${describe(v)}`).join("; ");
  }
  return String(detail);
}

async function problemFrom(res) {
  const text = await res.text().catch(() => "");
  let code = `http_${res.status}`;
  let detail = res.statusText || "the request failed";
  try {
    const body = JSON.parse(text);
    if (body && typeof body === "object") {
      code = typeof body.error === "string" && /^[a-z_]+$/.test(body.error) ? body.error : code;
      detail = describe(body.detail != null ? body.detail : body.error) || detail;
    }
  } catch {
    // not JSON (a proxy's HTML page, say): keep the status text rather than show markup
  }
  return new ApiProblem(res.status, code, detail);
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

async function api(path, { method = "GET", body, auth = false, as = "json", json = false } = {}) {
  const headers = {};
  if (json) headers["Content-Type"] = "application/json";
  if (auth) {
    if (!token()) throw new ApiProblem(0, "no_token", "enter the API token above first");
    headers.Authorization = `Bearer ${token()}`;
  }
  let res;
  try {
    res = await fetch(path, { method, body, headers });
  } catch (e) {
    throw new ApiProblem(0, "network", `could not reach the server (${e.message})`);
  }
  if (!res.ok) throw await problemFrom(res);
  if (as === "blob") return res.blob();
  if (as === "text") return res.text();
  try {
    return await res.json();
  } catch {
    throw new ApiProblem(res.status, "bad_response", "the server's answer was not JSON");
  }
}

// ---- small helpers ---------------------------------------------------------------------------

const pct = (x) => `${(100 * x).toFixed(1)}%`;

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k in node) node[k] = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function announce(text) {
  $("#status").textContent = text;
}

// Pictures behind the token cannot be <img src>: fetch them with the header, show a blob URL.
const pictures = new Map(); // picture path -> Promise<object URL>
function protectedPicture(path) {
  if (!pictures.has(path)) {
    const p = api(path, { auth: true, as: "blob" }).then((b) => URL.createObjectURL(b));
    p.catch(() => pictures.delete(path)); // try again next time
    pictures.set(path, p);
  }
  return pictures.get(path);
}

const feedbackPath = (id) => `feedback/${encodeURIComponent(id)}/image`;

function showPicture(img, msg, id, alt) {
  return showPictureAt(img, msg, feedbackPath(id), alt);
}

async function showPictureAt(img, msg, path, alt) {
  img.hidden = true;
  msg.hidden = true;
  try {
    img.src = await protectedPicture(path);
    img.alt = alt;
    img.hidden = false;
  } catch (e) {
    msg.textContent = `Picture unavailable: ${e.message}`;
    msg.hidden = false;
  }
}

// ---- token -------------------------------------------------------------------------------------

function showTokenState() {
  $("#token-state").textContent = token()
    ? "Token set for this tab."
    : "No token set: answers work; teaching and the feedback list need one.";
}

function setupToken() {
  $("#token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = $("#token").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    $("#token").value = "";
    showTokenState();
    loadFeedback();
    loadQueue();
  });
  $("#token-clear").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
    loadFeedback();
    loadQueue();
  });
  showTokenState();
}

// ---- answers -----------------------------------------------------------------------------------

const tab = { answers: 0, memory: 0 };
let cardCount = 0;
const cards = [];

function addFiles(files) {
  const list = Array.from(files);
  if (!list.length) return;
  announce(`Asking about ${list.length} file${list.length > 1 ? "s" : ""}...`);
  for (const file of list) {
    const card = makeCard(file);
    cards.push(card);
    $("#results").prepend(card.node);
    ask(card);
  }
}

function makeCard(file) {
  const id = ++cardCount;
  const node = $("#card-template").content.firstElementChild.cloneNode(true);
  const card = { id, file, node, prediction: null };
  $(".name", node).textContent = file.name || `image ${id}`;
  $("article", node).setAttribute("aria-label", `Answer for ${file.name || `image ${id}`}`);
  const thumb = $(".thumb", node);
  if (file.type.startsWith("image/")) {
    thumb.src = URL.createObjectURL(file);
    thumb.alt = `the uploaded file ${file.name}`;
    thumb.addEventListener("error", () => { thumb.hidden = true; });
  } else {
    thumb.hidden = true;
  }
  const input = $(".correct input", node);
  input.id = `label-${id}`;
  $(".correct label", node).htmlFor = input.id;
  $(".correct", node).addEventListener("submit", (ev) => { ev.preventDefault(); teach(card); });
  $(".again", node).addEventListener("click", () => ask(card));
  return card;
}

async function ask(card) {
  const n = card.node;
  $(".card-error", n).textContent = "";
  $(".card-msg", n).textContent = "";
  $(".pending", n).hidden = false;
  $(".pending", n).textContent = "Asking...";
  const form = new FormData();
  form.append("file", card.file, card.file.name || "image");
  try {
    const res = await api("predict", { method: "POST", body: form });
    const p = res.predictions[0];
    card.prediction = p;
    tab.answers += 1;
    if (p.path === "memory") tab.memory += 1;
    render(card, p);
    announce(p.abstained ? `${card.file.name}: unlike anything known; best guess ${p.label}.`
      : `${card.file.name}: ${p.label}, ${pct(p.confidence)} confident, from the ${p.path}.`);
    scheduleMemoryRefresh();
    scheduleQueueRefresh();
  } catch (e) {
    $(".pending", n).hidden = true;
    $(".card-error", n).textContent = e.message;
    announce(`${card.file.name}: ${e.message}`);
  }
}

function render(card, p) {
  const n = card.node;
  $(".pending", n).hidden = true;
  $(".answer", n).hidden = false;
  $(".details", n).hidden = false;
  $(".label", n).textContent = p.label;
  $(".confidence", n).textContent = `${pct(p.confidence)} confident`;
  const path = $(".path", n);
  // abstain: unlike anything the model knows; the label is its best guess
  path.textContent = { memory: "from memory", network: "from the network", abstain: "none of these?" }[p.path];
  path.className = `path badge ${p.path}`;
  path.title = p.ood_score === null ? "" : `ood_score ${p.ood_score.toFixed(1)}${p.abstained ? " (over the threshold)" : ""}`;
  const top = $(".top", n);
  top.replaceChildren(...p.top_k.map((c) => {
    const bar = el("span", { class: "bar" });
    bar.style.width = pct(Math.max(0, Math.min(1, c.score)));
    return el("li", {}, el("span", { class: "cls" }, c.label), el("span", { class: "track" }, bar),
      el("span", { class: "score" }, pct(c.score)));
  }));
  const text = $(".nearest-text", n);
  const img = $(".nearest-img", n);
  const msg = $(".nearest-img-msg", n);
  img.hidden = true;
  msg.hidden = true;
  if (!p.nearest) {
    text.textContent = "None: the memory is empty or this model has none.";
  } else {
    const near = p.nearest;
    text.textContent = `${near.label}, similarity ${near.similarity.toFixed(3)} (slot ${near.slot}` +
      (near.feedback_id != null ? `, taught by feedback #${near.feedback_id})` : ", from training)");
    if (near.feedback_id != null) {
      showPicture(img, msg, near.feedback_id, `stored feedback #${near.feedback_id}, labelled ${near.label}`);
    }
  }
}

async function teach(card) {
  const n = card.node;
  const input = $(".correct input", n);
  const label = input.value.trim();
  $(".card-error", n).textContent = "";
  if (!label) {
    $(".card-error", n).textContent = "Type or choose a label first.";
    input.focus();
    return;
  }
  if (!token()) {
    $(".card-error", n).textContent = "Enter the API token above first: teaching needs it.";
    $("#token").focus();
    return;
  }
  const form = new FormData();
  form.append("file", card.file, card.file.name || "image");
  form.append("label", label);
  $(".card-msg", n).textContent = `Teaching "${label}"...`;
  try {
    const res = await api("feedback", { method: "POST", body: form, auth: true });
    const item = res.items[0];
    const where = item.slot != null ? ` into slot ${item.slot}` : "";
    const replaced = item.replaced_label ? `, replacing an item of ${item.replaced_label}` : "";
    input.value = "";
    await ask(card);
    $(".card-msg", n).textContent = `Taught "${item.label}"${res.new_class ? " (a new class)" : ""}: feedback ` +
      `#${item.feedback_id}, ${item.action}${where}${replaced}.`;
    loadFeedback();
    refreshMemory();
  } catch (e) {
    $(".card-msg", n).textContent = "";
    $(".card-error", n).textContent = e.message;
  }
}

function setupPicker() {
  const input = $("#files");
  input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
  const drop = $("#drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    addFiles(ev.dataTransfer.files);
  });
  // a file dropped beside the zone must not navigate away from the page
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());
}

// ---- memory ------------------------------------------------------------------------------------

let memoryTimer = null;
function scheduleMemoryRefresh() {
  clearTimeout(memoryTimer);
  memoryTimer = setTimeout(refreshMemory, 300);
}

// predictions_total{path="memory",label="..."} 12.0 -> totals by path (all clients, since start)
function pathTotals(metricsText) {
  const totals = { memory: 0, network: 0 };
  for (const line of metricsText.split("\n")) {
    if (!line.startsWith("predictions_total{")) continue;
    const path = /path="(memory|network)"/.exec(line);
    const value = parseFloat(line.slice(line.lastIndexOf(" ") + 1));
    if (path && Number.isFinite(value)) totals[path[1]] += value;
  }
  return totals;
}

async function refreshMemory() {
  const msg = $("#memory-msg");
  try {
    const m = await api("memory");
    msg.textContent = "";
    $("#mem-size").textContent = m.size.toLocaleString();
    $("#mem-capacity").textContent = m.capacity ? m.capacity.toLocaleString() : "no memory";
    $("#mem-feedback").textContent = (m.feedback_items || 0).toLocaleString();
    $("#mem-fill").max = Math.max(1, m.capacity);
    $("#mem-fill").value = m.size;
    const rows = Object.entries(m.per_class).sort((a, b) => b[1] - a[1]);
    $("#per-class tbody").replaceChildren(...rows.map(([cls, count]) =>
      el("tr", {}, el("td", {}, cls), el("td", {}, count.toLocaleString()))));
    $("#class-names").replaceChildren(...(m.classes || Object.keys(m.per_class)).map((c) => el("option", { value: c })));
  } catch (e) {
    msg.textContent = `Memory unavailable: ${e.message}`;
  }
  try {
    const t = pathTotals(await api("metrics", { as: "text" }));
    const all = t.memory + t.network;
    $("#share-server").textContent = all
      ? `Server: ${pct(t.memory / all)} of ${all} answers since it started (all clients; predictions_total in /metrics).`
      : "Server: no answers yet since it started (predictions_total in /metrics).";
  } catch (e) {
    $("#share-server").textContent = `Server share unavailable: ${e.message}`;
  }
  $("#share-tab").textContent = tab.answers
    ? `This tab: ${tab.memory} of ${tab.answers} answers (${pct(tab.memory / tab.answers)}), counted in the page.`
    : "This tab: no answers yet (counted in the page).";
}

// ---- feedback list -----------------------------------------------------------------------------

let nextBefore = null;

async function loadFeedback(more = false) {
  const list = $("#feedback-list");
  const msg = $("#feedback-msg");
  const moreButton = $("#feedback-more");
  if (!token()) {
    list.replaceChildren();
    moreButton.hidden = true;
    msg.textContent = "Enter the API token above to see feedback.";
    return;
  }
  const query = `limit=${FEEDBACK_PAGE}` + (more && nextBefore != null ? `&before=${encodeURIComponent(nextBefore)}` : "");
  try {
    const page = await api(`feedback?${query}`, { auth: true });
    if (!more) list.replaceChildren();
    for (const item of page.items) list.append(feedbackItem(item));
    nextBefore = page.next_before;
    moreButton.hidden = nextBefore == null;
    msg.textContent = list.children.length ? "" : "No feedback yet.";
  } catch (e) {
    if (!more) list.replaceChildren();
    moreButton.hidden = true;
    msg.textContent = `Feedback list unavailable: ${e.message}`;
  }
}

function feedbackItem(item) {
  const when = new Date(item.time * 1000);
  const img = el("img", { class: "fb-img", alt: "", hidden: true });
  const imgMsg = el("p", { class: "help", hidden: true });
  const state = el("span", { class: "fb-state" }, item.forgotten ? "forgotten" : "");
  const button = el("button", { type: "button", class: "forget", disabled: item.forgotten },
    item.forgotten ? "Forgotten" : "Forget");
  button.setAttribute("aria-label", `Forget feedback #${item.id} (${item.label})`);
  const li = el("li", { class: item.forgotten ? "fb forgotten" : "fb" },
    img, imgMsg,
    el("div", { class: "fb-text" },
      el("strong", {}, item.label), ` #${item.id} `,
      el("time", { dateTime: when.toISOString() }, when.toLocaleString()), " ", state),
    button);
  li.dataset.id = item.id;
  if (item.forgotten) erased(img, imgMsg);
  else showPicture(img, imgMsg, item.id, `feedback #${item.id}, labelled ${item.label}`);
  button.addEventListener("click", () => forget(item, li, button, state, img, imgMsg));
  return li;
}

// a forgotten example's image is erased on the server: say so rather than ask for it
function erased(img, msg) {
  img.hidden = true;
  msg.textContent = "image erased";
  msg.hidden = false;
}

async function forget(item, li, button, state, img, imgMsg) {
  button.disabled = true;
  const msg = $("#feedback-msg");
  try {
    await api(`feedback/${encodeURIComponent(item.id)}`, { method: "DELETE", auth: true });
    li.classList.add("forgotten");
    state.textContent = "forgotten";
    erased(img, imgMsg);
    pictures.delete(feedbackPath(item.id));
    button.textContent = "Forgotten";
    msg.textContent = `Forgot feedback #${item.id} (${item.label}); asking the answers on this page again.`;
    await Promise.all(cards.filter((c) => c.prediction).map(ask));
    refreshMemory();
  } catch (e) {
    button.disabled = false;
    msg.textContent = `Could not forget #${item.id}: ${e.message}`;
  }
}

// ---- review queue ------------------------------------------------------------------------------
// Images the server kept because the model was unsure of them (REVIEW_QUEUE=on). One click or
// one key on an item teaches its best guess (A) or dismisses it (D); another class is typed.

const QUEUE_PAGE = 50;
let queueTimer = null;
let queueCount = 0;

// the server writes a queued image with its next commit: ask a moment after a prediction
function scheduleQueueRefresh() {
  clearTimeout(queueTimer);
  queueTimer = setTimeout(loadQueue, 500);
}

async function loadQueue() {
  const list = $("#queue-list");
  const msg = $("#queue-msg");
  if (!token()) {
    list.replaceChildren();
    msg.textContent = "Enter the API token above to see the review queue.";
    return;
  }
  try {
    const page = await api(`review?limit=${QUEUE_PAGE}`, { auth: true });
    const focusedId = document.activeElement && document.activeElement.closest
      && document.activeElement.closest(".qi") ? document.activeElement.closest(".qi").dataset.id : null;
    const typing = document.activeElement && document.activeElement.closest
      && document.activeElement.closest(".qi-other");
    if (typing) return; // never pull the list from under someone typing a class name
    list.replaceChildren(...page.items.map(queueItem));
    const again = focusedId && list.querySelector(`.qi[data-id="${CSS.escape(focusedId)}"]`);
    if (again) again.focus();
    msg.textContent = page.items.length
      ? `${page.size} image${page.size === 1 ? "" : "s"} to review (kept at most ${page.max_items}; ` +
        `answers under ${pct(page.confidence_below)} confident, or "none of these").`
      : "Nothing to review.";
  } catch (e) {
    list.replaceChildren();
    msg.textContent = e.code === "review_queue_off"
      ? "The review queue is off on this server (REVIEW_QUEUE=on keeps the images the model is unsure of)."
      : `Review queue unavailable: ${e.message}`;
  }
}

function queueItem(item) {
  const n = ++queueCount;
  const li = $("#queue-template").content.firstElementChild.cloneNode(true);
  li.dataset.id = item.id;
  li.dataset.path = item.image_url;
  const when = new Date(item.time * 1000);
  const sure = `${pct(item.confidence)} confident`;
  li.setAttribute("aria-label", `Review image #${item.id}: best guess ${item.label}, ${sure}` +
    (item.abstained ? ", none of these?" : ""));
  $(".qi-guess", li).textContent = item.label;
  $(".qi-confidence", li).textContent = sure;
  $(".qi-badge", li).hidden = !item.abstained;
  $(".qi-time", li).dateTime = when.toISOString();
  $(".qi-time", li).textContent = `#${item.id}, ${when.toLocaleString()}`;
  const accept = $(".qi-accept", li);
  accept.textContent = `Teach "${item.label}"`;
  accept.setAttribute("aria-label", `Teach the best guess "${item.label}" for review image #${item.id}`);
  const dismiss = $(".qi-dismiss", li);
  dismiss.setAttribute("aria-label", `Dismiss review image #${item.id}`);
  const input = $(".qi-other input", li);
  input.id = `queue-label-${n}`;
  $(".qi-other label", li).htmlFor = input.id;
  showPictureAt($(".qi-img", li), $(".qi-img-msg", li), item.image_url,
    `review image #${item.id}, best guess ${item.label}`);
  accept.addEventListener("click", () => teachQueued(item, li, item.label));
  dismiss.addEventListener("click", () => dismissQueued(item, li));
  $(".qi-other", li).addEventListener("submit", (ev) => {
    ev.preventDefault();
    const label = input.value.trim();
    if (label) teachQueued(item, li, label);
  });
  li.addEventListener("keydown", (ev) => {
    // the item's own keys; letters typed into its class field are text
    if (ev.target.closest(".qi-other") || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const key = ev.key.toLowerCase();
    if (key === "a") { ev.preventDefault(); teachQueued(item, li, item.label); }
    else if (key === "d" || key === "delete") { ev.preventDefault(); dismissQueued(item, li); }
  });
  return li;
}

function busy(li, on) {
  li.querySelectorAll("button, input").forEach((c) => { c.disabled = on; });
  li.setAttribute("aria-busy", on ? "true" : "false");
}

// the item is done: keyboard users land on the next one (or the one before, or the list's help)
function leave(li) {
  const next = li.nextElementSibling || li.previousElementSibling;
  li.remove();
  pictures.delete(li.dataset.path);
  if (next) next.focus();
  else $("#queue-refresh").focus();
}

async function teachQueued(item, li, label) {
  if (li.getAttribute("aria-busy") === "true") return;
  busy(li, true);
  $(".qi-error", li).textContent = "";
  try {
    const res = await api(`review/${encodeURIComponent(item.id)}/teach`, {
      method: "POST", auth: true, body: JSON.stringify({ label }), json: true,
    });
    const taught = res.items[0];
    leave(li);
    $("#queue-msg").textContent = `Taught "${taught.label}"${res.new_class ? " (a new class)" : ""} from review ` +
      `image #${item.id}: feedback #${taught.feedback_id}.`;
    loadFeedback();
    refreshMemory();
  } catch (e) {
    busy(li, false);
    $(".qi-error", li).textContent = e.message;
  }
}

async function dismissQueued(item, li) {
  if (li.getAttribute("aria-busy") === "true") return;
  busy(li, true);
  $(".qi-error", li).textContent = "";
  try {
    await api(`review/${encodeURIComponent(item.id)}`, { method: "DELETE", auth: true });
    leave(li);
    $("#queue-msg").textContent = `Dismissed review image #${item.id}: deleted from the server.`;
  } catch (e) {
    busy(li, false);
    $(".qi-error", li).textContent = e.message;
  }
}

// ---- start -------------------------------------------------------------------------------------

async function showModel() {
  try {
    const r = await api("readyz");
    $("#model-info").textContent = `Model: ${r.model}, version ${r.model_version}`;
  } catch (e) {
    $("#model-info").textContent = `Model: ${e.message}`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupToken();
  setupPicker();
  $("#memory-refresh").addEventListener("click", refreshMemory);
  $("#feedback-refresh").addEventListener("click", () => loadFeedback());
  $("#feedback-more").addEventListener("click", () => loadFeedback(true));
  $("#queue-refresh").addEventListener("click", loadQueue);
  showModel();
  refreshMemory();
  loadFeedback();
  loadQueue();
});
