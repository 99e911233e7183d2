// ragway's web page. Plain DOM code: no framework, no inline handlers (the page's CSP
// allows only this file), and every action goes through the same public API any client
// uses. The session is the HttpOnly `token` cookie; writes carry the CSRF token the
// server put in the readable `csrf_token` cookie.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { me: null, files: [], collections: [], users: [] };
const VIEWS = ["account", "files", "collections", "try", "users"];

function cookie(name) {
  for (const part of document.cookie.split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === name) return decodeURIComponent(v.join("="));
  }
  return "";
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const csrf = cookie("csrf_token");
  if (csrf) h["X-CSRF-Token"] = csrf;
  return h;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorOf(resp) {
  let detail = resp.status + " " + resp.statusText;
  try {
    const body = await resp.json();
    if (typeof body.detail === "string") detail = body.detail;
    else if (body.error && body.error.message) detail = body.error.message;
  } catch (_) { /* not JSON */ }
  return new ApiError(resp.status, detail);
}

async function api(method, path, body) {
  const resp = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!resp.ok) throw await errorOf(resp);
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

function say(text) {
  $("status").textContent = text;
  $("error").hidden = true;
}

function fail(err) {
  const e = $("error");
  e.textContent = err instanceof Error ? err.message : String(err);
  e.hidden = false;
  $("status").textContent = "";
}

// Runs an action from a button or form; errors go to the alert region.
function action(fn) {
  return async (ev) => {
    if (ev) ev.preventDefault();
    try {
      await fn(ev);
    } catch (err) {
      if (err instanceof ApiError && err.status === 401 && state.me) {
        state.me = null;
        show("signin");
      }
      fail(err);
    }
  };
}

// Views reload after every action and on navigation, so two loads of one view can overlap;
// only the newest may render, or an older answer would paint over a newer one.
const generations = {};
function latest(view) {
  const g = (generations[view] || 0) + 1;
  generations[view] = g;
  return () => generations[view] === g;
}

function el(tag, attrs, ...children) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") n.className = v;
    else if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) n.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c !== null && c !== undefined) n.append(c instanceof Node ? c : String(c));
  }
  return n;
}

function show(view) {
  for (const s of document.querySelectorAll("main > section")) s.hidden = true;
  const signedIn = state.me && state.me.role !== "pending";
  $("nav").hidden = !state.me;
  for (const a of $("nav").querySelectorAll("a")) a.hidden = !signedIn || (a.dataset.view === "users" && state.me.role !== "admin");
  if (!state.me) view = "signin";
  else if (state.me.role === "pending") view = "pending";
  else if (!VIEWS.includes(view) || (view === "users" && state.me.role !== "admin")) view = "account";
  for (const a of $("nav").querySelectorAll("a")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  $("view-" + view).hidden = false;
  document.title = "ragway: " + $("view-" + view).querySelector("h2").textContent;
  const load = { account: loadAccount, files: loadFiles, collections: loadCollections, try: loadTry, users: loadUsers }[view];
  if (load) action(load)();
}

function route() {
  show(location.hash.slice(1));
}

async function boot() {
  try {
    state.me = await api("GET", "/api/v1/auths/");
  } catch (err) {
    state.me = null;
    if (!(err instanceof ApiError && err.status === 401)) fail(err);
  }
  if (state.me && state.me.role === "pending") $("pending-email").textContent = state.me.email;
  route();
}

// ---------------------------------------------------------------- sign in / up / out

async function signedIn(me) {
  state.me = me;
  say("Signed in as " + me.email + ".");
  await boot();
}

function formValues(form) {
  const out = {};
  for (const input of form.querySelectorAll("input")) out[input.name] = input.value;
  return out;
}

$("signin-form").addEventListener("submit", action(async (ev) => {
  const f = formValues(ev.target);
  await signedIn(await api("POST", "/api/v1/auths/signin", { email: f.email, password: f.password }));
  ev.target.reset();
}));

$("signup-form").addEventListener("submit", action(async (ev) => {
  const f = formValues(ev.target);
  await signedIn(await api("POST", "/api/v1/auths/signup", f));
  ev.target.reset();
}));

$("signout").addEventListener("click", action(async () => {
  await api("POST", "/api/v1/auths/signout", {});
  state.me = null;
  say("Signed out.");
  show("signin");
}));

$("pending-check").addEventListener("click", action(async () => {
  await boot();
  if (state.me && state.me.role === "pending") say("Still waiting for approval.");
}));

// ---------------------------------------------------------------- account

async function loadAccount() {
  $("me-name").textContent = state.me.name;
  $("me-email").textContent = state.me.email;
  $("me-role").textContent = state.me.role;
  try {
    const k = await api("GET", "/api/v1/auths/api_key");
    $("key-info").textContent = "Key " + k.prefix + "… created " + new Date(k.created_at * 1000).toLocaleString() + ".";
    $("key-revoke").disabled = false;
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) throw err;
    $("key-info").textContent = "No API key.";
    $("key-revoke").disabled = true;
  }
}

$("key-create").addEventListener("click", action(async () => {
  const r = await api("POST", "/api/v1/auths/api_key", {});
  $("key-value").value = r.api_key;
  $("key-new").hidden = false;
  $("key-value").focus();
  $("key-value").select();
  say("API key created. It is shown only once.");
  await loadAccount();
}));

$("key-copy").addEventListener("click", action(async () => {
  const v = $("key-value").value;
  try {
    await navigator.clipboard.writeText(v);
  } catch (_) {
    // Clipboard API unavailable (plain http): fall back to the selection.
    $("key-value").select();
    document.execCommand("copy");
  }
  say("Key copied to the clipboard.");
}));

$("key-revoke").addEventListener("click", action(async () => {
  if (!confirm("Revoke your API key? Clients using it stop working at once.")) return;
  await api("DELETE", "/api/v1/auths/api_key");
  $("key-new").hidden = true;
  $("key-value").value = "";
  say("API key revoked.");
  await loadAccount();
}));

$("password-form").addEventListener("submit", action(async (ev) => {
  await api("POST", "/api/v1/auths/update/password", { password: $("pw-old").value, new_password: $("pw-new").value });
  ev.target.reset();
  say("Password changed; your other sessions were signed out.");
}));

// ---------------------------------------------------------------- files

function fileStatus(f) {
  return (f.data && f.data.status) || "pending";
}

function statusCell(status) {
  return el("span", { class: "status-" + status }, status);
}

function size(n) {
  if (typeof n !== "number") return "";
  if (n < 1024) return n + " B";
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1024 / 1024).toFixed(1) + " MiB";
}

async function fetchFiles() {
  const r = await api("GET", "/api/v1/files/?content=false");
  state.files = Array.isArray(r) ? r : r.items || [];
  return state.files;
}

async function loadFiles() {
  const rows = $("file-rows");
  const current = latest("files");
  const files = await fetchFiles();
  if (!current()) return;
  rows.replaceChildren(...files.map((f) => el("tr", { "data-file-id": f.id },
    el("td", {}, f.filename),
    el("td", {}, statusCell(fileStatus(f)), f.data && f.data.error ? el("div", { class: "error" }, f.data.error) : null),
    el("td", {}, size(f.meta && f.meta.size)),
    el("td", {}, el("button", {
      type: "button", class: "danger", "aria-label": "Delete " + f.filename,
      onclick: action(async () => {
        if (!confirm("Delete " + f.filename + " everywhere?")) return;
        await api("DELETE", "/api/v1/files/" + encodeURIComponent(f.id));
        say(f.filename + " deleted.");
        await loadFiles();
      }),
    }, "Delete")))));
  if (!files.length) rows.append(el("tr", {}, el("td", { colspan: "4" }, "No files yet.")));
}

// Sends one file with upload progress (fetch cannot report it), then follows the
// server's processing status until it is final.
function upload(file) {
  const progress = el("progress", { max: "100", value: "0", "aria-label": "Upload of " + file.name });
  const label = el("span", { class: "status-pending" }, "uploading");
  const item = el("li", { class: "row" }, el("span", {}, file.name), progress, label);
  $("uploads").append(item);
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/v1/files/");
    const csrf = cookie("csrf_token");
    if (csrf) xhr.setRequestHeader("X-CSRF-Token", csrf);
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) progress.value = Math.round((e.loaded / e.total) * 100);
    });
    xhr.addEventListener("error", () => reject(new Error("Upload of " + file.name + " failed: connection error")));
    xhr.addEventListener("load", () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      if (xhr.status !== 200 || !body) {
        label.textContent = "failed";
        label.className = "status-failed";
        reject(new ApiError(xhr.status, (body && body.detail) || "Upload of " + file.name + " failed (" + xhr.status + ")"));
        return;
      }
      progress.value = 100;
      label.textContent = "processing";
      follow(body.id, label, item).then(resolve, reject);
    });
    const form = new FormData();
    form.append("file", file);
    xhr.send(form);
  });
}

// The true processing status, as the server streams it (server-sent events).
function follow(id, label, item) {
  return new Promise((resolve) => {
    const source = new EventSource("/api/v1/files/" + encodeURIComponent(id) + "/process/status?stream=true");
    const done = (status, error) => {
      source.close();
      label.textContent = status + (error ? ": " + error : "");
      label.className = "status-" + (status === "completed" ? "completed" : "failed");
      item.dataset.status = status;
      resolve(status);
      action(loadFiles)();
    };
    source.addEventListener("message", (e) => {
      let s = {};
      try { s = JSON.parse(e.data); } catch (_) { return; }
      if (s.status === "completed" || s.status === "failed" || s.status === "not_found") done(s.status, s.error);
      else label.textContent = s.status || "processing";
    });
    source.addEventListener("error", () => {
      // The stream ends when the status is final; ask once more in case it ended early.
      api("GET", "/api/v1/files/" + encodeURIComponent(id) + "/process/status")
        .then((s) => (s.status === "pending" ? null : done(s.status, s.error)), () => done("failed", "status unavailable"));
    });
  });
}

$("upload-form").addEventListener("submit", action(async (ev) => {
  const files = [...$("upload-input").files];
  ev.target.reset();
  const results = await Promise.allSettled(files.map(upload));
  const failed = results.filter((r) => r.status === "rejected");
  if (failed.length) throw failed[0].reason;
  say(files.length + " file(s) uploaded and processed.");
}));

// ---------------------------------------------------------------- collections

async function fetchCollections() {
  const r = await api("GET", "/api/v1/knowledge/");
  state.collections = Array.isArray(r) ? r : r.items || [];
  return state.collections;
}

function grantForms(kb) {
  return (kb.access_grants || []).map((g) => ({ principal_type: g.principal_type, principal_id: g.principal_id, permission: g.permission }));
}

async function updateGrants(kb, grants) {
  await api("POST", "/api/v1/knowledge/" + encodeURIComponent(kb.id) + "/update", {
    name: kb.name, description: kb.description || "", access_grants: grants,
  });
}

function userLabel(id) {
  const u = state.users.find((x) => x.id === id);
  return u ? u.name + " <" + u.email + ">" : id;
}

async function collectionCard(kb) {
  const files = await api("GET", "/api/v1/knowledge/" + encodeURIComponent(kb.id) + "/files");
  const items = Array.isArray(files) ? files : files.items || [];
  const inKb = new Set(items.map((f) => f.id));
  const ready = state.files.filter((f) => fileStatus(f) === "completed" && !inKb.has(f.id));
  const base = "kb-" + kb.id;
  const select = el("select", { id: base + "-add" }, ...ready.map((f) => el("option", { value: f.id }, f.filename)));
  const canWrite = kb.write_access !== false;
  const fileList = el("ul", {}, ...items.map((f) => el("li", { class: "row" },
    el("span", {}, (f.meta && f.meta.name) || f.filename || f.id),
    canWrite ? el("button", {
      type: "button", class: "secondary", "aria-label": "Remove " + ((f.meta && f.meta.name) || f.id) + " from " + kb.name,
      onclick: action(async () => {
        await api("POST", "/api/v1/knowledge/" + encodeURIComponent(kb.id) + "/file/remove?delete_file=false", { file_id: f.id });
        say("File removed from " + kb.name + ".");
        await loadCollections();
      }),
    }, "Remove") : null)));
  if (!items.length) fileList.append(el("li", {}, "No files."));
  const grants = el("ul", {}, ...grantForms(kb).map((g, i) => el("li", { class: "row" },
    el("span", {}, (g.principal_id === "*" ? "everyone" : userLabel(g.principal_id)) + ": " + g.permission),
    canWrite ? el("button", {
      type: "button", class: "secondary", "aria-label": "Stop sharing with " + g.principal_id,
      onclick: action(async () => {
        const rest = grantForms(kb).filter((_, j) => j !== i);
        await updateGrants(kb, rest);
        say("Sharing updated.");
        await loadCollections();
      }),
    }, "Unshare") : null)));
  if (!kb.access_grants || !kb.access_grants.length) grants.append(el("li", {}, "Private."));
  const card = el("article", { class: "card", "data-kb-id": kb.id, "aria-labelledby": base + "-h" },
    el("h3", { id: base + "-h" }, kb.name),
    kb.description ? el("p", {}, kb.description) : null,
    el("h4", {}, "Files"), fileList);
  if (canWrite) {
    card.append(el("form", { class: "stack", onsubmit: action(async () => {
      if (!select.value) throw new Error("Upload a file and wait until it is completed first.");
      await api("POST", "/api/v1/knowledge/" + encodeURIComponent(kb.id) + "/file/add", { file_id: select.value });
      say("File added to " + kb.name + ".");
      await loadCollections();
    }) },
    el("label", { for: base + "-add" }, "Add a processed file"), select,
    el("button", { type: "submit", disabled: !ready.length }, "Add file")));
  }
  card.append(el("h4", {}, "Shared with"), grants);
  if (canWrite) {
    const who = el("input", { id: base + "-who", list: "user-ids", required: true, placeholder: "user id" });
    const perm = el("select", { id: base + "-perm" }, el("option", { value: "read" }, "read"), el("option", { value: "write" }, "write"));
    card.append(el("form", { class: "stack", onsubmit: action(async () => {
      const grants = grantForms(kb).filter((g) => g.principal_id !== who.value.trim());
      grants.push({ principal_type: "user", principal_id: who.value.trim(), permission: perm.value });
      await updateGrants(kb, grants);
      say(kb.name + " shared.");
      await loadCollections();
    }) },
    el("label", { for: base + "-who" }, "Share with (user id)"), who,
    el("label", { for: base + "-perm" }, "Permission"), perm,
    el("button", { type: "submit" }, "Share")));
  }
  return card;
}

async function loadCollections() {
  const current = latest("collections");
  await fetchFiles();
  if (state.me.role === "admin") {
    // Only suggestions for the share box: a failure here must not hide the collections.
    await fetchUsers().catch(() => { state.users = []; });
    $("user-ids").replaceChildren(...state.users.filter((u) => u.id !== state.me.id)
      .map((u) => el("option", { value: u.id }, u.name + " <" + u.email + ">")));
  }
  const kbs = await fetchCollections();
  const cards = [];
  for (const kb of kbs) cards.push(await collectionCard(kb));
  if (!current()) return;
  $("kb-list").replaceChildren(...cards);
  if (!kbs.length) $("kb-list").append(el("p", {}, "No collections yet."));
}

$("kb-form").addEventListener("submit", action(async (ev) => {
  await api("POST", "/api/v1/knowledge/create", { name: $("kb-name").value, description: $("kb-description").value });
  ev.target.reset();
  say("Collection created.");
  await loadCollections();
}));

// ---------------------------------------------------------------- try it

async function loadTry() {
  const [kbs, models] = await Promise.all([fetchCollections(), api("GET", "/api/models")]);
  const keep = (sel) => sel.value;
  const kbSel = $("ask-collection");
  const was = keep(kbSel);
  kbSel.replaceChildren(...kbs.map((k) => el("option", { value: k.id }, k.name)));
  if (was) kbSel.value = was;
  const mSel = $("ask-model");
  const wasModel = keep(mSel);
  mSel.replaceChildren(...(models.data || []).map((m) => el("option", { value: m.id }, m.name || m.id)));
  if (wasModel) mSel.value = wasModel;
}

function sourceItems(sources) {
  const out = [];
  for (const s of sources || []) {
    const docs = s.document || [];
    const metas = s.metadata || [];
    docs.forEach((text, i) => {
      const m = metas[i] || {};
      const name = m.name || m.source || (s.source && s.source.name) || "source";
      out.push(el("li", { class: "source" },
        el("strong", {}, name),
        s.source && s.source.name && s.source.name !== name ? " (" + s.source.name + ")" : "",
        el("blockquote", {}, text.length > 400 ? text.slice(0, 400) + "…" : text)));
    });
  }
  return out;
}

$("ask-form").addEventListener("submit", action(async () => {
  const kbSel = $("ask-collection");
  if (!kbSel.value) throw new Error("Create a collection first.");
  const name = kbSel.selectedOptions[0].textContent;
  say("Asking…");
  const r = await api("POST", "/api/chat/completions", {
    model: $("ask-model").value,
    stream: false,
    messages: [{ role: "user", content: $("ask-question").value }],
    files: [{ type: "collection", id: kbSel.value, name }],
  });
  const msg = r.choices && r.choices[0] && r.choices[0].message;
  $("answer").textContent = (msg && msg.content) || (r.message && r.message.content) || "(empty answer)";
  const items = sourceItems(r.sources);
  $("sources").replaceChildren(...items);
  if (!items.length) $("sources").append(el("li", {}, "No source matched."));
  $("answer-box").hidden = false;
  say("Answered.");
}));

// ---------------------------------------------------------------- users (admin)

async function fetchUsers() {
  const all = [];
  for (let page = 1; page <= 100; page++) {
    const r = await api("GET", "/api/v1/users/?page=" + page);
    const users = Array.isArray(r) ? r : r.users || [];
    all.push(...users);
    if (Array.isArray(r) || users.length === 0 || all.length >= (r.total || 0)) break;
  }
  state.users = all;
  return all;
}

async function updateUser(u, changes) {
  await api("POST", "/api/v1/users/" + encodeURIComponent(u.id) + "/update", Object.assign({
    role: u.role, name: u.name, email: u.email, profile_image_url: u.profile_image_url || "",
  }, changes));
}

function userRow(u) {
  const base = "user-" + u.id;
  const self = u.id === state.me.id;
  const role = el("select", { id: base + "-role", "aria-label": "Role of " + u.email, disabled: self },
    ...["pending", "user", "admin"].map((r) => el("option", { value: r, selected: r === u.role }, r)));
  const actions = el("div", { class: "row" });
  if (u.role === "pending") {
    actions.append(el("button", { type: "button", "data-action": "approve", onclick: action(async () => {
      await updateUser(u, { role: "user" });
      say(u.email + " approved.");
      await loadUsers();
    }) }, "Approve"));
  }
  if (!self) {
    actions.append(el("button", { type: "button", class: "secondary", onclick: action(async () => {
      await updateUser(u, { role: role.value });
      say("Role of " + u.email + " is now " + role.value + ".");
      await loadUsers();
    }) }, "Save role"));
    const pw = el("input", { type: "password", id: base + "-pw", autocomplete: "new-password", "aria-label": "New password for " + u.email, placeholder: "new password" });
    actions.append(pw, el("button", { type: "button", class: "secondary", onclick: action(async () => {
      if (!pw.value) throw new Error("Type the new password first.");
      await updateUser(u, { password: pw.value });
      pw.value = "";
      say("Password of " + u.email + " reset; their sessions were signed out.");
    }) }, "Reset password"));
    actions.append(el("button", { type: "button", class: "danger", onclick: action(async () => {
      if (!confirm("Delete " + u.email + " with their keys, files and collections?")) return;
      await api("DELETE", "/api/v1/users/" + encodeURIComponent(u.id));
      say(u.email + " deleted.");
      await loadUsers();
    }) }, "Delete"));
  }
  return el("tr", { "data-user-email": u.email },
    el("td", {}, u.name), el("td", {}, u.email), el("td", {}, role), el("td", {}, actions));
}

async function loadUsers() {
  const current = latest("users");
  const users = await fetchUsers();
  if (!current()) return;
  $("user-rows").replaceChildren(...users.map(userRow));
}

window.addEventListener("hashchange", route);
boot();
