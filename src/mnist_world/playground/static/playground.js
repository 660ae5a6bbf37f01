// The playground page: a WebSocket to the server carries commands one way (restart, the controls, play,
// pause, step) and frames the other, pushed as they are dreamed, with every unmasking iteration when the page
// watches them. Frames are drawn enlarged without smoothing, with the ego digit's tracked centre and the
// commanded arrow over the dream. The session lives as long as this tab's connection: every tab plays its own.
"use strict";

const KEYS = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
const ARROW_GAIN = 4; // the arrow is drawn this many frames long, so a one-frame move is visible
const STRIP_SCALE = 3;
const STRIP_GAP = 4;
const COLOURS = { given: "#46aa5a", dreamed: "#e68c28", centre: "#3cc8ff", text: "#e6e6e6", hidden: [40, 70, 190] };

// Everything the page knows; exposed for the browser test and for anyone curious in the console.
const state = {
  session: null,
  sequence: null,
  seed: null,
  checkpoint: null,
  frames: [], // frame messages from the server: {frame, pixels, action, centre, given, truth, belief?}
  iterations: [], // the unmasking iterations of the latest watched frame: {frame, iteration, pixels, hidden, ...}
  following: true, // the iteration view shows the newest iteration
  size: 32,
  step: 0,
  window: 0,
  keep: 0,
  context: 0,
  truthLeft: 0,
  playing: false,
  busy: false,
  connected: false,
  held: new Set(),
  latencies: [], // generation_ms of recent frames
  arrivals: [], // performance.now() of recent frames
  error: "",
};
window.playground = state;

const $ = (id) => document.getElementById(id);
let socket = null;

function send(command) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(command));
}

async function getJSON(path) {
  const response = await fetch(path);
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

const bytes = (base64) => Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));

// Grey levels as an image; `hidden` (grey levels too, 255 where a token is still masked) tints those blue.
function greyImage(base64, hidden = null) {
  const grey = bytes(base64);
  const mask = hidden ? bytes(hidden) : null;
  const image = new ImageData(state.size, state.size);
  for (let i = 0; i < grey.length; i++) {
    const rgb = mask && mask[i] > 127 ? COLOURS.hidden : [grey[i], grey[i], grey[i]];
    image.data.set([...rgb, 255], 4 * i);
  }
  return small(image);
}

// A confidence in [0, 1] as a colour from deep purple (unsure) to yellow (sure).
function heatImage(base64) {
  const level = bytes(base64);
  const image = new ImageData(state.size, state.size);
  for (let i = 0; i < level.length; i++) {
    const c = level[i] / 255;
    image.data.set([32 + 223 * Math.min(1, 1.6 * c), 244 * c * c, 48 + 62 * Math.sin(Math.PI * c), 255], 4 * i);
  }
  return small(image);
}

function small(image) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = state.size;
  canvas.getContext("2d").putImageData(image, 0, 0);
  return canvas;
}

function drawImage(canvas, source, x = 0, y = 0, width = canvas.width, height = canvas.height) {
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = false; // each token stays a crisp square
  context.drawImage(source, x, y, width, height);
}

function drawFrame(canvas, base64, x, y, width, height) {
  drawImage(canvas, greyImage(base64), x, y, width, height);
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

function renderBelief(latest) {
  const [expected, confidence] = [$("show-expected").checked, $("show-confidence").checked];
  $("belief-panel").hidden = !(expected || confidence);
  $("expected-panel").hidden = !expected;
  $("confidence-panel").hidden = !confidence;
  const belief = latest && latest.belief;
  if (expected) belief ? drawFrame($("expected"), belief.expected) : drawBlank($("expected"), "given frame");
  if (confidence) belief ? drawImage($("confidence"), heatImage(belief.confidence)) : drawBlank($("confidence"), "given frame");
}

function renderIterations() {
  $("unmasking-panel").hidden = !$("show-unmasking").checked;
  if ($("unmasking-panel").hidden) return;
  const shown = state.iterations;
  const slider = $("iteration");
  slider.max = Math.max(1, shown.length);
  if (state.following) slider.value = slider.max; // the newest iteration, until the slider is moved
  const chosen = shown[Math.min(Number(slider.value), shown.length) - 1];
  $("unmasking-frame").textContent = shown.length ? shown[0].frame : "-";
  $("iteration-value").textContent = chosen ? `${chosen.iteration} of ${chosen.iterations}` : "-";
  if (!chosen) {
    for (const id of ["iteration-kept", "iteration-expected", "iteration-confidence"]) drawBlank($(id), "step a frame");
  } else {
    drawImage($("iteration-kept"), greyImage(chosen.pixels, chosen.hidden));
    drawFrame($("iteration-expected"), chosen.expected);
    drawImage($("iteration-confidence"), heatImage(chosen.confidence));
  }
  const canvas = $("iterations");
  const context = canvas.getContext("2d");
  context.fillStyle = "#181818";
  context.fillRect(0, 0, canvas.width, canvas.height);
  const cell = Math.min(48, Math.floor(canvas.width / Math.max(1, shown.length)) - 4);
  context.font = "11px system-ui, sans-serif";
  shown.forEach((message, index) => {
    const left = index * (cell + 4);
    if (message === chosen) {
      context.fillStyle = "#8a6fd1";
      context.fillRect(left - 2, 12, cell + 4, cell + 4);
    }
    drawImage(canvas, greyImage(message.pixels, message.hidden), left, 14, cell, cell);
    context.fillStyle = COLOURS.text;
    context.fillText(`${message.iteration}`, left + 2, 10);
  });
}

function render() {
  const latest = state.frames[state.frames.length - 1];
  if (latest) {
    drawFrame($("dream"), latest.pixels);
    drawOverlay($("dream"), latest.centre);
  }
  renderBelief(latest);
  renderIterations();
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
  $("reset").disabled = !state.session;
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
  sendControls();
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
  sendControls();
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

// What every next frame is dreamed under; sent whenever any of it changes.
function sendControls() {
  send({
    op: "controls",
    action: commanded(),
    temperature: Number($("temperature").value),
    truth: $("show-truth").checked,
    belief: $("show-expected").checked || $("show-confidence").checked,
    unmasking: $("show-unmasking").checked,
    fps: Number($("speed").value),
  });
}

function started(start) {
  Object.assign(state, {
    session: start.session,
    sequence: start.sequence,
    seed: start.seed,
    checkpoint: start.checkpoint,
    frames: start.frames,
    iterations: [],
    size: start.frame_size,
    step: start.step,
    window: start.window,
    keep: start.keep,
    context: start.frames.length,
    truthLeft: start.truth_left,
    latencies: [],
    arrivals: [],
    busy: false,
  });
  $("download-gif").href = `/api/recording.gif?session=${encodeURIComponent(start.session)}`;
  $("download-actions").href = `/api/recording.json?session=${encodeURIComponent(start.session)}`;
  showNotes(start.notes);
  showError("");
  sendControls(); // the step size is known now: the held arrows' action with it
  if (state.autoplay) {
    state.autoplay = false;
    send({ op: "play" });
  }
}

function arrived(message) {
  if (message.frame !== state.frames.length) return; // from before a restart
  const truthEnded = state.truthLeft > 0 && message.truth_left === 0;
  state.frames.push(message);
  state.context = message.context;
  state.truthLeft = message.truth_left;
  state.busy = false;
  remember(state.latencies, message.generation_ms);
  remember(state.arrivals, performance.now());
  if (truthEnded && $("show-truth").checked) showNotes(["The true future of this sequence has ended: steer on."]);
  else showError("");
}

function iterationArrived(message) {
  if (!state.iterations.length || state.iterations[0].frame !== message.frame) state.iterations = [];
  state.iterations.push(message);
  state.following = true; // show each iteration as it arrives
}

function receive(event) {
  const message = JSON.parse(event.data);
  if (message.type === "start") started(message);
  else if (message.type === "frame") arrived(message);
  else if (message.type === "iteration") iterationArrived(message);
  else if (message.type === "state") state.playing = message.playing;
  else if (message.type === "error") {
    state.busy = false;
    showError(message.error);
  }
  render();
}

function connect() {
  return new Promise((resolve, reject) => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/api/live`);
    socket.addEventListener("open", () => {
      state.connected = true;
      resolve();
    });
    socket.addEventListener("message", receive);
    socket.addEventListener("close", () => {
      const was = state.connected;
      Object.assign(state, { connected: false, playing: false, busy: false });
      showError(was ? "the connection to the server closed: reload the page" : "cannot reach the server");
      render();
      reject(new Error("closed"));
    });
  });
}

function stepOnce() {
  if (state.busy || state.playing || !state.session) return;
  state.busy = true;
  send({ op: "step" });
  renderStats();
}

function togglePlay() {
  if (!state.session) return;
  send({ op: state.playing ? "pause" : "play" });
}

function restart(sequence, seed, checkpoint) {
  send({ op: "restart", sequence, seed, checkpoint });
}

function restartFromForm() {
  const [sequence, seed] = [Number($("sequence").value), Number($("seed").value)];
  if (!Number.isInteger(sequence) || !Number.isInteger(seed)) {
    showError("sequence and seed must be whole numbers");
    return;
  }
  restart(sequence, seed, $("checkpoint").value);
}

function bindSlider(id, format) {
  const input = $(id);
  const show = () => { $(`${id}-value`).textContent = format(Number(input.value)); };
  input.addEventListener("input", () => {
    show();
    sendControls();
  });
  input.addEventListener("change", () => input.blur()); // give the arrow keys back to steering
  show();
}

async function main() {
  bindSlider("speed", (value) => value.toFixed(0));
  bindSlider("temperature", (value) => value.toFixed(2));
  $("restart-form").addEventListener("submit", (event) => {
    event.preventDefault();
    restartFromForm();
  });
  $("play").addEventListener("click", togglePlay);
  $("step").addEventListener("click", stepOnce);
  $("reset").addEventListener("click", () => restart(state.sequence, state.seed, state.checkpoint));
  for (const id of ["show-truth", "show-expected", "show-confidence", "show-unmasking"]) {
    $(id).addEventListener("change", () => {
      if (id === "show-truth" && $(id).checked && state.truthLeft === 0) {
        showNotes(["The true future of this sequence has ended: restart to see it again."]);
      }
      sendControls();
      $(id).blur();
      render();
    });
  }
  $("iteration").addEventListener("input", () => {
    state.following = false;
    renderIterations();
  });
  $("checkpoint").addEventListener("change", () => $("checkpoint").blur());
  try {
    const config = await getJSON("/api/config");
    $("sequence").value = config.sequence;
    $("sequence-range").textContent = `(${config.sequences[0]}..${config.sequences[1]})`;
    $("seed").value = config.seed;
    for (const name of config.checkpoints) $("checkpoint").add(new Option(name, name, false, name === config.checkpoint));
    $("temperature").value = config.temperature;
    $("temperature").dispatchEvent(new Event("input"));
    await connect();
  } catch (error) {
    if (!state.error) showError(error.message);
    return;
  }
  state.autoplay = !new URLSearchParams(location.search).has("paused");
  restartFromForm();
}

main();
