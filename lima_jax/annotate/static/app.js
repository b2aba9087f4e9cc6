// The annotation page. The server holds all state (next item, side order, progress, choices);
// the browser keeps only the annotator's name and the access token. Every text from the study
// is set with textContent, never as HTML, so an answer with markup or <script> is shown as text.
"use strict";

const NAME_KEY = "lima-annotate-annotator";
const TOKEN_KEY = "lima-annotate-token";
const KEYS = {a: "left", "1": "left", ArrowLeft: "left", n: "neither", "2": "neither",
              b: "right", "3": "right", ArrowRight: "right"};

const state = {item: null, shownAt: 0, back: 0, busy: false, progress: null};

function $(id) { return document.getElementById(id); }

function showOnly(id) {
  for (const section of ["token-form", "login", "task", "done"]) $(section).hidden = section !== id;
  $("choices").hidden = id !== "task" && !(id === "done" && state.progress && state.progress.done > 0);
  $("choices").classList.toggle("finished", id === "done");  // Only "Back" is left to press.
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

class Unauthorized extends Error {}

async function api(path, body) {
  const headers = {"Content-Type": "application/json"};
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch("/api/" + path, body === undefined ? {headers} :
                               {method: "POST", headers, body: JSON.stringify(body)});
  if (response.status === 401) throw new Unauthorized();
  const data = await response.json();
  if (!response.ok) {
    const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
    const error = new Error(detail || response.statusText);
    error.status = response.status;
    throw error;
  }
  return data;
}

function annotator() { return localStorage.getItem(NAME_KEY); }

function turnBlock(text, role, isLast) {
  const block = document.createElement("div");
  block.className = "turn " + role + (isLast ? " last" : "");
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role === "user" ? "User" : "Assistant";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  block.append(who, body);
  return block;
}

function renderItem(item) {
  const turns = item.conversation;
  $("conversation").replaceChildren(
      ...turns.map((text, i) => turnBlock(text, i % 2 === 0 ? "user" : "assistant", i === turns.length - 1)));
  $("answer-left").textContent = item.left;
  $("answer-right").textContent = item.right;
  for (const button of document.querySelectorAll(".choice")) {
    button.classList.toggle("chosen", button.dataset.choice === item.choice);
    button.disabled = false;
  }
}

function renderProgress(progress) {
  state.progress = progress;
  const current = Math.min(progress.done + (state.item && !state.back ? 1 : 0), progress.total);
  $("progress").hidden = false;
  $("progress-text").textContent = state.back ? `reviewing (${progress.done} of ${progress.total} done)`
                                               : `${current} of ${progress.total}`;
  $("progress-fill").style.width = progress.total ? `${100 * progress.done / progress.total}%` : "0%";
  $("progress").title = `study: ${progress.study_done} of ${progress.study_total} labels`;
}

function show(payload) {
  state.item = payload.item;
  renderProgress(payload.progress);
  $("back").disabled = state.back >= payload.progress.done;
  $("resume").hidden = !state.back;
  $("review-banner").hidden = !state.back;
  if (state.back) {
    $("review-banner").textContent = `Your answer ${state.back} back is highlighted. Choose again to change ` +
        "it, go further back, or press Esc to return to the next item.";
  }
  if (!payload.item) {
    $("done-text").textContent = `You labelled ${payload.progress.done} items. ` +
        "You can still go back and change an answer, or close this page.";
    showOnly("done");
    return;
  }
  renderItem(payload.item);
  showOnly("task");
  window.scrollTo(0, 0);
  state.shownAt = performance.now();
}

async function run(action) {
  if (state.busy) return;
  state.busy = true;
  try {
    show(await action());
  } catch (error) {
    if (error instanceof Unauthorized) {
      localStorage.removeItem(TOKEN_KEY);
      showOnly("token-form");
      $("token-input").focus();
    } else {
      setStatus("Not saved: " + error.message, true);
    }
  } finally {
    state.busy = false;
  }
}

function loadNext() {
  state.back = 0;
  return run(() => api("next?annotator=" + encodeURIComponent(annotator())));
}

function loadPrevious(back) {
  state.back = back;
  return run(() => api(`previous?annotator=${encodeURIComponent(annotator())}&back=${back}`));
}

function choose(choice) {
  if (!state.item || state.busy) return;
  const seconds = (performance.now() - state.shownAt) / 1000;
  const body = {annotator: annotator(), id: state.item.id, choice, seconds};
  for (const button of document.querySelectorAll(".choice")) button.disabled = true;
  state.back = 0;
  if (document.activeElement) document.activeElement.blur();  // Enter must not press it again.
  return run(async () => {
    try {
      const next = await api("label", body);
      setStatus(`Saved (${new Date().toLocaleTimeString()})`, false);
      return next;
    } catch (error) {
      if (error.status !== 409) throw error;
      setStatus("Not saved: enough annotators took this item meanwhile. Here is your next one.", true);
      return api("next?annotator=" + encodeURIComponent(annotator()));
    }
  }).then(() => { for (const button of document.querySelectorAll(".choice")) button.disabled = false; });
}

function start() {
  const name = annotator();
  if (!name) {
    showOnly("login");
    $("who").hidden = true;
    $("progress").hidden = true;
    $("name-input").focus();
    return;
  }
  $("who-name").textContent = name;
  $("who").hidden = false;
  loadNext();
}

function onKey(event) {
  if (event.target.closest("input, textarea") || event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  if (KEYS[key] && !$("task").hidden) {
    event.preventDefault();
    choose(KEYS[key]);
  } else if ((key === "Backspace" || key === "u") && !$("back").disabled && !$("choices").hidden) {
    event.preventDefault();
    loadPrevious(state.back + 1);
  } else if (key === "Escape" && state.back) {
    event.preventDefault();
    loadNext();
  }
}

function bind() {
  $("token-entry").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    connect();
  });
  $("name-entry").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("name-input").value.trim();
    if (name) localStorage.setItem(NAME_KEY, name);
    start();
  });
  $("switch").addEventListener("click", () => {
    localStorage.removeItem(NAME_KEY);
    $("name-input").value = "";
    start();
  });
  for (const button of document.querySelectorAll(".choice")) {
    button.addEventListener("click", () => choose(button.dataset.choice));
  }
  $("back").addEventListener("click", () => loadPrevious(state.back + 1));
  $("resume").addEventListener("click", loadNext);
  document.addEventListener("keydown", onKey);
}

async function connect() {
  try {
    const study = await api("study");
    $("question").textContent = study.question;
    for (const [side, text] of Object.entries(study.options)) $("option-" + side).textContent = text;
  } catch (error) {
    if (error instanceof Unauthorized) {
      localStorage.removeItem(TOKEN_KEY);
      showOnly("token-form");
      return;
    }
    setStatus("Cannot reach the server: " + error.message, true);
    return;
  }
  start();
}

document.addEventListener("DOMContentLoaded", () => {
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    localStorage.setItem(TOKEN_KEY, params.get("token"));
    history.replaceState(null, "", location.pathname);  // Keep the token out of the address bar.
  }
  bind();
  connect();
});
