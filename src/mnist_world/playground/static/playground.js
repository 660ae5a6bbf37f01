// The playground page: asks the server for one dreamed frame at a time under the action the held arrow keys
// command, draws frames enlarged without smoothing, and overlays the ego digit's tracked centre and the
// commanded arrow. The session id lives in this tab's memory only, so every tab plays its own run.
"use strict";

const KEYS = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
const ARROW_GAIN = 4; // the arrow is drawn this many frames long, so a one-frame move is visible
const STRIP_SCALE = 3;
const STRIP_GAP = 4;
const COLOURS = { given: "#46aa5a", dreamed: "#e68c28", centre: "#3cc8ff", text: "#e6e6e6" };

// Everything the page knows; exposed for the browser test and for anyone curious in the console.
const state = {
  session: null,
  sequence: null,
  frames: [], // messages from the server: {frame, pixels, action, centre, given, truth}
  size: 32,
  step: 0,
  window: 0,
  keep: 0,
  context: 0,
  truthLeft: 0,
  playing: false,
  busy: false,
  pending: null, // the step in flight, awaited before a restart
  held: new Set(),
  latencies: [], // generation_ms of recent frames
  arrivals: [], // performance.now() of recent frames
  error: "",
};
window.playground = state;

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const payload = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok) throw new Error(payload.error || `${response.status} ${response.statusText}`);
  return payload;
}

function showError(message) {
  state.error = message;
  $("error").textContent = message;
  $("error").hidden = !message;
}

function showNotes(notes) {
  $("notes").textContent = notes.join(" ");
  $("notes").hidden = notes.length === 0;
}

// --- Drawing ------------------------------------------------------------------------------------------

function greyImage(base64) {
  const grey = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const image = new ImageData(state.size, state.size);
  for (let i = 0; i < grey.length; i++) {
    image.data[4 * i] = image.data[4 * i + 1] = image.data[4 * i + 2] = grey[i];
    image.data[4 * i + 3] = 255;
  }
  const small = document.createElement("canvas");
  small.width = small.height = state.size;
  small.getContext("2d").putImageData(image, 0, 0);
  return small;
}

function drawFrame(canvas, base64, x = 0, y = 0, width = canvas.width, height = canvas.height) {
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = false; // each token stays a crisp square
  context.drawImage(greyImage(base64), x, y, width, height);
}

function drawBlank(canvas, text) {
  const context = canvas.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.fillStyle = "#888";
  context.font = "16px system-ui, sans-serif";
  context.textAlign = "center";
  context.fillText(text, canvas.width / 2, canvas.height / 2);
}

function drawOverlay(canvas, centre) {
  if (!centre) return;
  const context = canvas.getContext("2d");
  const scale = canvas.width / state.size;
  const [x, y] = [centre[0] * scale, centre[1] * scale];
  context.strokeStyle = context.fillStyle = COLOURS.centre;
  context.lineWidth = 2;
  context.beginPath();
  context.arc(x, y, 6, 0, 2 * Math.PI);
  context.stroke();
  const [dx, dy] = arrow();
  const length = (ARROW_GAIN * scale * state.size) / 2; // an action is a move over half the frame
  const [tx, ty] = [x + dx * length, y + dy * length];
  if (Math.hypot(tx - x, ty - y) < 8) {
    context.beginPath();
    context.arc(x, y, 2, 0, 2 * Math.PI);
    context.fill();
    return;
  }
  const angle = Math.atan2(ty - y, tx - x);
  context.lineWidth = 3;
  context.beginPath();
  context.moveTo(x, y);
  context.lineTo(tx, ty);
  context.stroke();
  context.beginPath();
  context.moveTo(tx, ty);
  context.lineTo(tx - 12 * Math.cos(angle - 0.45), ty - 12 * Math.sin(angle - 0.45));
  context.lineTo(tx - 12 * Math.cos(angle + 0.45), ty - 12 * Math.sin(angle + 0.45));
  context.closePath();
  context.fill();
}

function drawStrip() {
  const canvas = $("strip");
  const context = canvas.getContext("2d");
  const cell = state.size * STRIP_SCALE;
  const count = Math.floor((canvas.width + STRIP_GAP) / (cell + 2 * 3 + STRIP_GAP));
  const shown = state.frames.slice(-count);
  context.fillStyle = "#181818";
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.font = "12px system-ui, sans-serif";
  shown.forEach((message, index) => {
    const left = index * (cell + 6 + STRIP_GAP);
    context.fillStyle = message.given ? COLOURS.given : COLOURS.dreamed;
    context.fillRect(left, 16, cell + 6, cell + 6);
    drawFrame(canvas, message.pixels, left + 3, 19, cell, cell);
    context.fillStyle = COLOURS.text;
    context.fillText(`t=${message.frame}`, left + 2, 12);
  });
}

function render() {
  const latest = state.frames[state.frames.length - 1];
  if (latest) {
    drawFrame($("dream"), latest.pixels);
    drawOverlay($("dream"), latest.centre);
  }
  const showTruth = $("show-truth").checked;
  $("truth-panel").hidden = !showTruth;
  if (showTruth) {
    if (latest && latest.truth) drawFrame($("truth"), latest.truth);
    else drawBlank($("truth"), "no true frame here");
  }
  drawStrip();
  renderStats();
}

function renderStats() {
  const dreamed = state.frames.filter((message) => !message.given).length;
  $("stat-frame").textContent = `${state.frames.length - 1} (${dreamed} dreamed)`;
  $("stat-context").textContent = `${state.context} of ${state.window} (slides to ${state.keep})`;
  const latency = state.latencies[state.latencies.length - 1];
  $("stat-latency").textContent = latency === undefined ? "-" : `${latency.toFixed(0)} ms`;
  const times = state.arrivals;
  $("stat-rate").textContent = times.length < 2 ? "-"
    : `${((1000 * (times.length - 1)) / (times[times.length - 1] - times[0])).toFixed(1)} frames/s`;
  const [dx, dy] = arrow();
  const named = dx === 0 && dy === 0 ? "still" : `[${dx.toFixed(3)}, ${dy.toFixed(3)}]`;
  $("stat-action").textContent = truthPlaying() ? `the dataset's: ${named}` : named;
  $("play").textContent = state.playing ? "Pause" : "Play";
  $("step").disabled = state.busy || state.playing || !state.session;
  for (const button of document.querySelectorAll("#pad button")) {
    button.classList.toggle("held", state.held.has(button.dataset.key));
  }
}

// --- Steering -----------------------------------------------------------------------------------------

function commanded() {
  let [dx, dy] = [0, 0];
  for (const key of state.held) {
    dx += KEYS[key][0];
    dy += KEYS[key][1];
  }
  const norm = Math.hypot(dx, dy);
  return norm === 0 ? [0, 0] : [(state.step * dx) / norm, (state.step * dy) / norm];
}

// The true future plays the dataset's actions, not the keys: then the arrow shows the one just played.
function truthPlaying() {
  return $("show-truth").checked && state.truthLeft > 0;
}

function arrow() {
  const latest = state.frames[state.frames.length - 1];
  return truthPlaying() && latest ? latest.action : commanded();
}

function hold(key, down) {
  if (down) state.held.add(key);
  else state.held.delete(key);
  render();
}

function typing(target) {
  return target instanceof HTMLInputElement && (target.type === "text" || target.type === "number");
}

window.addEventListener("keydown", (event) => {
  if (typing(event.target)) return;
  if (event.key in KEYS) {
    event.preventDefault(); // no scrolling, no slider moves
    if (!state.held.has(event.key)) hold(event.key, true);
  } else if (event.key === " " && !(event.target instanceof HTMLButtonElement)) {
    event.preventDefault();
    togglePlay();
  }
});
window.addEventListener("keyup", (event) => {
  if (event.key in KEYS) hold(event.key, false);
});
window.addEventListener("blur", () => {
  state.held.clear();
  render();
});

for (const button of document.querySelectorAll("#pad button")) {
  const key = button.dataset.key;
  button.addEventListener("pointerdown", (event) => {
    button.setPointerCapture(event.pointerId);
    hold(key, true);
  });
  for (const name of ["pointerup", "pointercancel", "lostpointercapture"]) {
    button.addEventListener(name, () => state.held.has(key) && hold(key, false));
  }
  button.addEventListener("contextmenu", (event) => event.preventDefault()); // a long touch is a hold
}

// --- Playing ------------------------------------------------------------------------------------------

function remember(list, value, length = 10) {
  list.push(value);
  if (list.length > length) list.shift();
}

async function dreamOne() {
  const session = state.session;
  const truth = truthPlaying();
  const message = await api("/api/step", {
    session,
    frame: state.frames.length,
    action: commanded(),
    temperature: Number($("temperature").value),
    truth,
  });
  if (session !== state.session || message.frame !== state.frames.length) return; // restarted meanwhile
  state.frames.push(message);
  state.context = message.context;
  state.truthLeft = message.truth_left;
  remember(state.latencies, message.generation_ms);
  remember(state.arrivals, performance.now());
  if (truth && state.truthLeft === 0) showNotes(["The true future of this sequence has ended: steer on."]);
}

async function stepOnce() {
  if (state.busy || !state.session) return;
  state.busy = true;
  renderStats();
  state.pending = dreamOne();
  try {
    await state.pending;
    showError("");
  } catch (error) {
    showError(error.message);
    state.playing = false;
  } finally {
    state.busy = false;
    state.pending = null;
    render();
  }
}

async function loop() {
  while (state.playing) {
    const started = performance.now();
    await stepOnce();
    const rest = 1000 / Number($("speed").value) - (performance.now() - started);
    if (rest > 0) await sleep(rest);
  }
}

function togglePlay() {
  if (!state.session) return;
  state.playing = !state.playing;
  renderStats();
  if (state.playing) loop();
}

async function restart() {
  const wasPlaying = state.playing;
  state.playing = false;
  if (state.pending) await state.pending.catch(() => {});
  try {
    const start = await api("/api/restart", {
      session: state.session,
      sequence: Number($("sequence").value),
      seed: Number($("seed").value),
      checkpoint: $("checkpoint").value,
    });
    Object.assign(state, {
      session: start.session,
      sequence: start.sequence,
      frames: start.frames,
      size: start.frame_size,
      step: start.step,
      window: start.window,
      keep: start.keep,
      context: start.frames.length,
      truthLeft: start.truth_left,
      latencies: [],
      arrivals: [],
    });
    $("download-gif").href = `/api/recording.gif?session=${encodeURIComponent(start.session)}`;
    $("download-actions").href = `/api/recording.json?session=${encodeURIComponent(start.session)}`;
    showNotes(start.notes);
    showError("");
    render();
    if (wasPlaying || state.autoplay) {
      state.autoplay = false;
      togglePlay();
    }
  } catch (error) {
    showError(error.message);
    render();
  }
}

function bindSlider(id, format) {
  const input = $(id);
  const show = () => { $(`${id}-value`).textContent = format(Number(input.value)); };
  input.addEventListener("input", show);
  input.addEventListener("change", () => input.blur()); // give the arrow keys back to steering
  show();
}

async function main() {
  bindSlider("speed", (value) => value.toFixed(0));
  bindSlider("temperature", (value) => value.toFixed(2));
  $("restart-form").addEventListener("submit", (event) => {
    event.preventDefault();
    restart();
  });
  $("play").addEventListener("click", togglePlay);
  $("step").addEventListener("click", stepOnce);
  $("show-truth").addEventListener("change", () => {
    if ($("show-truth").checked && state.truthLeft === 0) {
      showNotes(["The true future of this sequence has ended: restart to see it again."]);
    }
    render();
  });
  try {
    const config = await api("/api/config");
    $("sequence").value = config.sequence;
    $("sequence-range").textContent = `(${config.sequences[0]}..${config.sequences[1]})`;
    $("seed").value = config.seed;
    $("checkpoint").value = config.checkpoint;
    $("temperature").value = config.temperature;
    $("temperature").dispatchEvent(new Event("input"));
  } catch (error) {
    showError(error.message);
    return;
  }
  state.autoplay = !new URLSearchParams(location.search).has("paused");
  await restart();
}

main();
