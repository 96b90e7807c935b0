// PackForcing live viewer: websocket control (docs/protocol.md, version 1) + WebRTC receive-only video.
// No build step. State lives in the `viewer` object (exposed as window.viewer for debugging and tests).
"use strict";

const $ = (id) => document.getElementById(id);
const BACKOFF_S = [1, 2, 4, 8, 15, 30];                 // automatic reconnect delays
const NO_RETRY = new Set(["unauthorized", "forbidden_origin", "idle_timeout"]);
const READABLE = {
  busy: "The server is full right now. Retrying shortly…",
  starting: "The server is still loading its model. Retrying shortly…",
  unauthorized: "This server needs an access token.",
  forbidden_origin: "This page's address is not allowed to use the server (ask the operator for --allowed-origin).",
  idle_timeout: "The session ended after a period of inactivity. Press Connect to start again.",
  connection_failed: "The video connection failed (network or firewall). Reconnecting…",
  shutting_down: "The server is restarting. Reconnecting…",
  rate_limited: "Too many requests; slow down a little.",
  prompt_too_long: "That prompt is too long.",
  lost: "Lost the connection to the server. Reconnecting…",
  moved: "Moving your stream to another server…",
  worker_lost: "The server running your stream stopped. Starting a new stream…",
};

const viewer = {
  ws: null, pc: null, welcome: null, stats: null,
  wanted: false,          // the user asked to be connected (drives automatic reconnect)
  attempt: 0, retryTimer: null, quickRetries: 0,
  ids: 0, pending: new Map(),
  paused: false, serverRecording: false,
  recorder: null, recChunks: [], recStart: 0, recTimer: null,
  lastAck: null,          // {text, effective_chunk}
  decoded: 0, decodedAt: 0, decodeFps: 0,
  token: new URLSearchParams(location.search).get("token") || "",
};
window.viewer = viewer;

// ------------------------------------------------------------------------------------------------ ui helpers

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = "pill " + (kind || "idle");
  const idle = { "connecting…": "Connecting…", "negotiating…": "Starting the video…", reconnecting: "Waiting to reconnect…",
                 refused: "Not connected.", ended: "Session ended." };
  $("placeholder-text").textContent = idle[text] || (text === "disconnected" ? "Press Connect to start a live stream." : "");
}

function say(text, info) {
  const el = $("message");
  el.textContent = text || "";
  el.className = "message" + (info ? " info" : "");
}

function log(text) {
  const li = document.createElement("li");
  li.textContent = new Date().toLocaleTimeString() + "  " + text;
  const list = $("log");
  list.prepend(li);
  while (list.children.length > 60) list.lastChild.remove();
}

function enableControls(on) {
  for (const id of ["prompt", "transition", "blend", "send", "pause", "reset", "seed", "record"]) $(id).disabled = !on;
  $("server-record").disabled = !(on && viewer.welcome && viewer.welcome.recording_available);
  $("connect").textContent = viewer.wanted ? "Disconnect" : "Connect";
}

function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function fmt(x, digits) { return x == null ? "–" : Number(x).toFixed(digits); }

// ------------------------------------------------------------------------------------------------ connection

function wsUrl() {
  const u = new URL("ws", location.href);
  u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (viewer.token) u.searchParams.set("token", viewer.token);
  const resume = loadResume();                  // a session the server keeps for us (--reconnect-grace)
  if (resume) { u.searchParams.set("resume", resume.session); u.searchParams.set("key", resume.key); }
  return u.toString();
}

// sessionStorage survives a page reload, so a reload resumes the same stream while the server keeps it.
function loadResume() {
  try { return JSON.parse(sessionStorage.getItem("packforcing-resume") || "null"); } catch { return null; }
}
function saveResume(welcome) {
  if (welcome.resume_key) {
    sessionStorage.setItem("packforcing-resume", JSON.stringify({ session: welcome.session, key: welcome.resume_key }));
  } else sessionStorage.removeItem("packforcing-resume");
}

function connect() {
  viewer.wanted = true;
  clearTimeout(viewer.retryTimer);
  teardown();
  setStatus("connecting…", "wait");
  say("");
  enableControls(false);
  const ws = viewer.ws = new WebSocket(wsUrl());
  let fatal = null;
  ws.onmessage = (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch { return; }
    if (msg.type === "error" && msg.fatal) fatal = msg.code;
    onMessage(msg);
  };
  ws.onclose = (ev) => {
    if (ws !== viewer.ws) return;
    teardown();
    enableControls(false);
    if (!viewer.wanted) { setStatus("disconnected"); return; }
    const code = fatal || "lost";
    if (NO_RETRY.has(code)) {
      viewer.wanted = false;
      enableControls(false);
      setStatus(code === "idle_timeout" ? "ended" : "refused", "bad");
      say(READABLE[code] || "The server closed the session.");
      if (code === "unauthorized") $("token-row").hidden = false;
      return;
    }
    scheduleReconnect(code);
  };
}

// While the server restarts (it saves our session with --state-dir), retry about every second instead of backing
// off, so the stream is back within ~1 s of the new server being ready; after ~2 minutes, back off as usual.
const RESTART_CODES = new Set(["shutting_down", "starting", "lost"]);
const QUICK_RETRIES = 120;

function scheduleReconnect(code) {
  const quick = loadResume() && RESTART_CODES.has(code) && viewer.quickRetries < QUICK_RETRIES;
  const delay = quick ? 1 : BACKOFF_S[Math.min(viewer.attempt, BACKOFF_S.length - 1)] * (0.8 + 0.4 * Math.random());
  if (quick) viewer.quickRetries++;
  else viewer.attempt++;
  setStatus("reconnecting", "bad");
  let left = Math.ceil(delay);
  const base = READABLE[code] || "The session ended.";
  say(base + "  (retry in " + left + " s)");
  const tick = () => {
    left--;
    if (!viewer.wanted) return;
    if (left <= 0) { connect(); return; }
    say(base + "  (retry in " + left + " s)");
    viewer.retryTimer = setTimeout(tick, 1000);
  };
  viewer.retryTimer = setTimeout(tick, 1000);
}

function disconnect() {
  viewer.wanted = false;
  clearTimeout(viewer.retryTimer);
  sessionStorage.removeItem("packforcing-resume");
  if (viewer.ws) viewer.ws.close(1000, "bye");      // 1000: the server ends the session now (no grace)
  teardown();
  setStatus("disconnected");
  say("");
  enableControls(false);
}

function teardown() {
  stopRecording();
  if (viewer.pc) { viewer.pc.close(); viewer.pc = null; }
  if (viewer.ws) {
    const ws = viewer.ws;
    viewer.ws = null;
    try { ws.close(); } catch { /* already closed */ }
  }
  for (const [, p] of viewer.pending) p.reject(new Error("disconnected"));
  viewer.pending.clear();
  viewer.paused = false; viewer.serverRecording = false;
  $("pause").textContent = "Pause";
  $("server-record").classList.remove("on");
  $("video").srcObject = null;
  $("placeholder").hidden = false;
}

function send(msg) {
  const ws = viewer.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) return Promise.reject(new Error("not connected"));
  msg.id = "c" + (++viewer.ids);
  ws.send(JSON.stringify(msg));
  return new Promise((resolve, reject) => viewer.pending.set(msg.id, { resolve, reject }));
}

async function startVideo() {
  const pc = viewer.pc = new RTCPeerConnection({ iceServers: [] });
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.ontrack = (ev) => {
    $("video").srcObject = ev.streams[0] || new MediaStream([ev.track]);
    $("placeholder").hidden = true;
  };
  pc.onconnectionstatechange = () => {
    log("media " + pc.connectionState);
    if (pc !== viewer.pc) return;
    if (pc.connectionState === "connected") { setStatus("live", "live"); viewer.attempt = 0; viewer.quickRetries = 0; say(""); }
    if (pc.connectionState === "failed") { say(READABLE.connection_failed); viewer.ws && viewer.ws.close(); }
  };
  await pc.setLocalDescription(await pc.createOffer());
  await iceGatheringDone(pc, 3000);            // no trickle: the offer carries every candidate
  const answer = await send({ type: "offer", sdp: pc.localDescription.sdp });
  if (pc !== viewer.pc) return;
  await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
}

function iceGatheringDone(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") { pc.removeEventListener("icegatheringstatechange", done); resolve(); } };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

// ------------------------------------------------------------------------------------------------ messages

function onMessage(msg) {
  if (msg.id != null && viewer.pending.has(msg.id) && msg.type !== "stats") {
    const p = viewer.pending.get(msg.id);
    viewer.pending.delete(msg.id);
    if (msg.type === "error") p.reject(Object.assign(new Error(msg.message), { code: msg.code }));
    else p.resolve(msg);
  }
  switch (msg.type) {
    case "welcome": return onWelcome(msg);
    case "stats": return onStats(msg);
    case "error":
      log("error " + msg.code + ": " + msg.message);
      if (!msg.fatal) say(READABLE[msg.code] && msg.code !== "prompt_too_long" ? READABLE[msg.code] : msg.message);
      return;
    case "ack": return log("ack " + msg["for"] + (msg.effective_chunk != null ? " → chunk " + msg.effective_chunk : ""));
  }
}

function onWelcome(msg) {
  viewer.welcome = msg;
  saveResume(msg);
  viewer.paused = !!msg.paused;
  $("pause").textContent = viewer.paused ? "Resume" : "Pause";
  $("token-row").hidden = true;
  document.documentElement.style.setProperty("--aspect", msg.width + " / " + msg.height);
  $("prompt").maxLength = msg.limits.max_prompt_chars;
  $("blend").max = msg.limits.max_blend_chunks;
  $("prompt").placeholder = msg.prompt;
  setStatus("negotiating…", "wait");
  enableControls(true);
  const info = { session: msg.session, preset: msg.preset, size: msg.width + "×" + msg.height,
                 fps: msg.fps, protocol: "v" + msg.version, "buffer": msg.chunks_ahead + " chunks" };
  $("info").innerHTML = "";
  for (const [k, v] of Object.entries(info)) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    $("info").append(dt, dd);
  }
  log((msg.resumed ? "resumed session " : "welcome: session ") + msg.session + " (" + msg.preset + ", chunk " + msg.chunk_index + ")");
  // a picture picked before connecting is sent before the offer, so generation starts from it
  const picture = viewer.picture && !msg.resumed ? sendPicture(viewer.picture) : Promise.resolve();
  picture.finally(() => startVideo().catch((e) => { say("Could not start video: " + e.message); log("offer failed: " + e.message); }));
}

function onStats(s) {
  viewer.stats = s;
  $("s-fps").textContent = fmt(s.fps_sent, 0) + (viewer.decodeFps ? " / " + fmt(viewer.decodeFps, 0) : "");
  $("s-decoded").textContent = viewer.decoded || "–";
  $("s-rtf").textContent = fmt(s.rtf_wall != null ? s.rtf_wall : s.rtf, 2);   // as this viewer experiences it
  $("s-chunk").textContent = s.chunk_index + (s.playing_chunk != null ? " (▶ " + s.playing_chunk + ")" : "");
  $("s-buffer").textContent = s.buffer_frames + " fr";
  $("s-repeated").textContent = s.repeated_frames;
  if (s.playing_prompt && $("prompt").placeholder !== "now playing: " + s.playing_prompt) {
    $("prompt").placeholder = "now playing: " + s.playing_prompt;   // what is on screen, not what it started with
  }
  const cache = s.cache || {};
  $("s-cache").textContent = fmtBytes(cache.kv_bytes);
  const parts = cache.partitions || {};
  $("s-parts").textContent = Object.entries(parts)
    .map(([name, p]) => name + " " + p.tokens + " tok " + fmtBytes(p.bytes)).join(" · ");
  if (s.state === "paused") setStatus("paused", "wait");
  else if (viewer.pc && viewer.pc.connectionState === "connected") setStatus(s.repeated_frames && s.buffer_frames === 0 ? "live (catching up)" : "live", "live");
  const ack = viewer.lastAck;
  if (ack && s.playing_chunk != null && s.playing_chunk >= ack.effective_chunk && !ack.shown) {
    ack.shown = true;
    $("ack").className = "ack";
    $("ack").textContent = "▶ now showing: “" + ack.text + "” (since chunk " + ack.effective_chunk + ")";
  }
  pollDecoder();
}

async function pollDecoder() {
  const pc = viewer.pc;
  if (!pc) return;
  const report = await pc.getStats();
  report.forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "video") {
      const now = performance.now();
      if (viewer.decodedAt && r.framesDecoded >= viewer.decoded) {
        viewer.decodeFps = (r.framesDecoded - viewer.decoded) * 1000 / (now - viewer.decodedAt);
      }
      viewer.decoded = r.framesDecoded || 0;
      viewer.decodedAt = now;
    }
  });
}

// ------------------------------------------------------------------------------------------------ controls

$("connect").onclick = () => (viewer.wanted ? disconnect() : (viewer.attempt = 0, connect()));

$("transition").onchange = () => { $("blend").hidden = $("transition").value !== "blend"; };

$("prompt-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) {                                       // say so: a silently ignored Enter looks like a broken page
    say("Type a prompt first: an empty prompt changes nothing.", true);
    $("prompt").focus();
    return;
  }
  const msg = { type: "prompt", text, transition: $("transition").value };
  if (msg.transition === "blend") msg.blend_chunks = Number($("blend").value) || 4;
  $("ack").className = "ack pending";
  $("ack").textContent = "sending…";
  try {
    const ack = await send(msg);
    viewer.lastAck = { text, effective_chunk: ack.effective_chunk, shown: false };
    $("ack").className = "ack";
    $("ack").textContent = "✓ prompt accepted (" + ack.transition + "): takes effect at chunk " + ack.effective_chunk;
    $("prompt").select();
    say("");
  } catch (e) {
    $("ack").textContent = "";
    say(e.code === "rate_limited" ? READABLE.rate_limited : e.message);
  }
};

$("pause").onclick = async () => {
  try {
    await send({ type: viewer.paused ? "resume" : "pause" });
    viewer.paused = !viewer.paused;
    $("pause").textContent = viewer.paused ? "Resume" : "Pause";
  } catch (e) { say(e.message); }
};

$("reset").onclick = async () => {
  const msg = { type: "reset" };
  const seed = $("seed").value;
  if (seed !== "") msg.seed = Number(seed);
  try { await send(msg); $("ack").textContent = "↺ stream restarted" + (seed !== "" ? " with seed " + seed : ""); }
  catch (e) { say(e.message); }
};

$("server-record").onclick = async () => {
  try {
    const ack = await send({ type: "record", action: viewer.serverRecording ? "stop" : "start" });
    viewer.serverRecording = ack.recording;
    $("server-record").classList.toggle("on", ack.recording);
    say(ack.recording ? "Recording on the server to " + ack.file
                      : "Server recording saved: " + ack.file + " (" + ack.frames + " frames)", true);
  } catch (e) { say(e.message); }
};

$("record").onclick = () => (viewer.recorder ? stopRecording() : startRecording());

function startRecording() {
  const stream = $("video").srcObject;
  if (!stream) { say("Nothing to record yet."); return; }
  const type = ["video/webm;codecs=vp9", "video/webm;codecs=vp8", "video/webm"].find((t) => MediaRecorder.isTypeSupported(t));
  const rec = viewer.recorder = new MediaRecorder(stream, type ? { mimeType: type } : undefined);
  viewer.recChunks = [];
  rec.ondataavailable = (ev) => ev.data.size && viewer.recChunks.push(ev.data);
  rec.onstop = () => {
    const blob = new Blob(viewer.recChunks, { type: "video/webm" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "packforcing-" + new Date().toISOString().replace(/[:.]/g, "-") + ".webm";
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  };
  rec.start(1000);
  viewer.recStart = Date.now();
  $("rec-badge").hidden = false;
  $("record").classList.add("on");
  $("record").textContent = "Stop & save";
  viewer.recTimer = setInterval(() => {
    const s = Math.floor((Date.now() - viewer.recStart) / 1000);
    $("rec-time").textContent = Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
  }, 500);
}

function stopRecording() {
  if (!viewer.recorder) return;
  viewer.recorder.stop();
  viewer.recorder = null;
  clearInterval(viewer.recTimer);
  $("rec-badge").hidden = true;
  $("record").classList.remove("on");
  $("record").textContent = "Record WebM";
}

$("show-stats").onchange = () => $("overlay").classList.toggle("hidden", !$("show-stats").checked);

$("token-row").onsubmit = (ev) => {
  ev.preventDefault();
  viewer.token = $("token").value.trim();
  viewer.attempt = 0;
  connect();
};

// ------------------------------------------------------------------------------------------------ pictures
// A picture (with the prompt box's text, which may be empty) starts the stream over from it, or, with "restart"
// off, cuts to it mid-stream. Picked while disconnected, it is sent right after the welcome, before the offer,
// so the stream starts from it. The thumbnail is the server's: the picture fitted to the stream (cover + crop).

async function sendPicture(file) {
  const limits = (viewer.welcome && viewer.welcome.limits) || {};
  if (!/^image\/(png|jpeg|webp)$/.test(file.type)) { say("Choose a PNG, JPEG or WebP picture (this is " + (file.type || "not an image") + ")."); return; }
  if (limits.max_image_bytes && file.size > limits.max_image_bytes) {
    say("That picture is " + fmtBytes(file.size) + "; the limit is " + fmtBytes(limits.max_image_bytes) + "."); return;
  }
  if (!viewer.ws || viewer.ws.readyState !== WebSocket.OPEN) {
    viewer.picture = file;
    say("The stream will start from " + file.name + " when connected.", true);
    return;
  }
  viewer.picture = null;
  const data = await new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
  const text = $("prompt").value.trim();
  const restart = $("picture-restart").checked;
  $("drop").classList.add("busy");
  try {
    const ack = await send({ type: "image", data, text, restart, transition: $("transition").value });
    $("picture-img").src = ack.thumbnail;
    $("picture-caption").textContent = (ack.start ? "the stream starts from " : "cut to at chunk " + ack.effective_chunk + ": ")
      + file.name + " (" + ack.width + "×" + ack.height + ")" + (text ? " with “" + text + "”" : ", no prompt");
    $("picture-thumb").hidden = false;
    viewer.lastAck = { text: text || file.name, effective_chunk: ack.effective_chunk, shown: false };
    say("");
    log("picture " + file.name + " → chunk " + ack.effective_chunk);
  } catch (e) {
    say("Picture refused: " + e.message);
  } finally {
    $("drop").classList.remove("busy");
  }
}

$("picture-file").onchange = () => {
  const file = $("picture-file").files[0];
  $("picture-file").value = "";               // picking the same file again still fires
  if (file) sendPicture(file);
};
$("drop").onkeydown = (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); $("picture-file").click(); } };
for (const [name, over] of [["dragenter", true], ["dragover", true], ["dragleave", false], ["drop", false]]) {
  $("drop").addEventListener(name, (ev) => { ev.preventDefault(); $("drop").classList.toggle("over", over); });
}
$("drop").addEventListener("drop", (ev) => {
  const file = ev.dataTransfer && ev.dataTransfer.files[0];
  if (file) sendPicture(file);
});

// Connect on load unless ?autoconnect=0.
if (new URLSearchParams(location.search).get("autoconnect") !== "0") connect();
