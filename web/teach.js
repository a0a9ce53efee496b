/*
 * Teach page: capture camera or screen plus microphone, publish over WHIP, show who watches.
 *
 * window.skyclass.state() → "idle" | "connecting" | "live" | "error"
 * window.skyclass.stats() → outbound video figures plus the codecs this page asked for and offered.
 */
(function () {
  "use strict";

  const sc = window.skyclass;
  const room = sc.roomFromPath();
  const token = sc.tokenFromQuery();
  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"), roomName: $("room-name"), preview: $("preview"), placeholder: $("placeholder"),
    previewBtn: $("preview-btn"), start: $("start"), stop: $("stop"), message: $("message"),
    viewers: $("viewers"), roomLive: $("room-live"), codec: $("codec"), since: $("since"),
  };
  const sourceInputs = Array.from(document.querySelectorAll('input[name="source"]'));

  const AUDIO = { echoCancellation: true, noiseSuppression: true, autoGainControl: true };
  const LABELS = { idle: "Not live", connecting: "Connecting…", live: "Live", error: "Error" };

  let state = "idle";
  let media = null; // the MediaStream in the preview, and what is published
  let mediaSource = null; // "camera" | "screen"
  let connection = null; // skyclass.Connection while publishing
  let lastError = null;
  let preferredVideoCodec = null; // "video/H264" once setCodecPreferences accepted H.264 first

  function setState(next, label) {
    state = next;
    ui.status.dataset.state = next;
    ui.status.textContent = label || LABELS[next];
    refreshButtons();
  }

  function refreshButtons() {
    ui.previewBtn.disabled = Boolean(media);
    ui.start.disabled = Boolean(connection);
    ui.stop.disabled = !connection && !media;
  }

  function showMessage(text, kind = "info") {
    ui.message.textContent = text || "";
    ui.message.dataset.kind = kind;
  }

  function selectedSource() {
    return (sourceInputs.find((input) => input.checked) || sourceInputs[0]).value;
  }

  // ---- media ------------------------------------------------------------------------------

  async function acquire(source) {
    const devices = navigator.mediaDevices;
    if (!devices) throw new Error("this page needs a secure context (https or localhost) for camera access");
    if (source === "screen") {
      if (!devices.getDisplayMedia) throw new Error("this browser cannot share the screen");
      const screen = await devices.getDisplayMedia({ video: { frameRate: { ideal: 15, max: 30 } }, audio: false });
      const video = screen.getVideoTracks()[0];
      // Slides and code must stay legible: the encoder should drop frames rather than sharpness.
      video.contentHint = "detail";
      let mic;
      try {
        mic = await devices.getUserMedia({ audio: AUDIO });
      } catch (err) {
        video.stop();
        throw new Error(`microphone: ${err.message}`);
      }
      // The browser's own "Stop sharing" button ends the track without telling the page otherwise.
      video.addEventListener("ended", () => {
        if (mediaSource === "screen" && media && media.getVideoTracks()[0] === video) {
          showMessage("Screen sharing was stopped. Choose Camera or share the screen again.", "warn");
        }
      });
      return new MediaStream([video, ...mic.getAudioTracks()]);
    }
    return devices.getUserMedia({
      video: { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } },
      audio: AUDIO,
    });
  }

  /** Show a new stream and, when live, swap it into the running session without renegotiating. */
  async function useMedia(stream, source) {
    const old = media;
    media = stream;
    mediaSource = source;
    ui.preview.srcObject = stream;
    ui.preview.classList.toggle("mirror", source === "camera");
    ui.placeholder.classList.add("hidden");
    const pc = connection && connection.session && connection.session.pc;
    if (pc && pc.signalingState !== "closed") {
      for (const sender of pc.getSenders()) {
        const kind = sender.track ? sender.track.kind : null;
        const next = kind && stream.getTracks().find((t) => t.kind === kind);
        if (next) await sender.replaceTrack(next);
      }
    }
    if (old && old !== stream) old.getTracks().forEach((t) => t.stop());
    refreshButtons();
  }

  function releaseMedia() {
    if (media) media.getTracks().forEach((t) => t.stop());
    media = null;
    mediaSource = null;
    ui.preview.srcObject = null;
    ui.placeholder.classList.remove("hidden");
    refreshButtons();
  }

  async function ensureMedia() {
    const source = selectedSource();
    if (media && mediaSource === source) return true;
    try {
      await useMedia(await acquire(source), source);
      return true;
    } catch (err) {
      showMessage(`Cannot use the ${source === "screen" ? "screen" : "camera"}: ${err.message}`, "error");
      return false;
    }
  }

  // ---- publishing ---------------------------------------------------------------------------

  /** Called for every (re)connection: send what the preview shows, H.264 preferred. */
  function prepare(pc) {
    for (const track of media.getTracks()) {
      const transceiver = pc.addTransceiver(track, { direction: "sendonly", streams: [media] });
      if (track.kind !== "video") continue;
      // H.264 lets the server record and serve HLS without transcoding. Browsers that cannot
      // encode it (or cannot set preferences) send their default, VP8, which the server accepts.
      const prefs = sc.h264First("video");
      preferredVideoCodec = null;
      if (prefs) {
        try {
          transceiver.setCodecPreferences(prefs);
          preferredVideoCodec = "video/H264";
        } catch (err) {
          console.warn("skyclass: cannot prefer H.264, using the browser default", err);
        }
      }
    }
  }

  function onConnectionState(next, detail) {
    if (next === "connecting") {
      setState("connecting", detail ? "Reconnecting…" : "Connecting…");
    } else if (next === "connected") {
      lastError = null;
      setState("live");
      showMessage("You are live. Students in this room can see and hear you.");
    } else if (next === "retrying") {
      setState("connecting", "Reconnecting…");
      const why = lastError ? lastError.reason : "connection lost";
      showMessage(`${why} — retrying in ${Math.ceil(detail / 1000)} s`, "warn");
    } else if (next === "error") {
      connection = null;
      setState("error");
      showMessage(`Cannot publish: ${detail.reason}`, "error");
    }
  }

  async function start() {
    if (!token) {
      setState("error");
      showMessage("This link has no token. Open the teacher link you were given (it ends in ?token=…).", "error");
      return;
    }
    ui.start.disabled = true;
    showMessage("");
    if (!(await ensureMedia())) {
      setState("error");
      return;
    }
    connection = new sc.Connection({
      kind: "whip", room, token, prepare,
      onState: onConnectionState,
      onError: (err) => { lastError = err; },
    });
    connection.start();
    refreshButtons();
  }

  async function stop() {
    const running = connection;
    connection = null;
    // The peer connection closes at once; only the DELETE that tells the server is awaited.
    const ending = running ? running.stop() : Promise.resolve();
    releaseMedia();
    setState("idle");
    showMessage(running ? "Ending the lesson…" : "");
    await ending;
    if (running && state === "idle") showMessage("The lesson has ended for your students.");
  }

  // ---- room state ---------------------------------------------------------------------------

  async function pollRoom() {
    try {
      const info = await sc.roomState(room);
      ui.viewers.textContent = String(info.viewers);
      ui.roomLive.textContent = info.live ? `live${info.publisher ? ` (${info.publisher})` : ""}` : "not live";
      ui.codec.textContent = sc.codecName(info.codecs && info.codecs.video) || "–";
      ui.since.textContent = info.started_at ? new Date(info.started_at * 1000).toLocaleTimeString() : "–";
    } catch (err) {
      ui.roomLive.textContent = "server unreachable";
    }
  }

  /** Video codec names in the order the last offer listed them (what the browser offered). */
  function offeredVideoCodecs(pc) {
    const sdp = pc && pc.localDescription ? pc.localDescription.sdp : "";
    const section = sdp.split(/\r?\nm=/).find((s) => s.startsWith("video"));
    if (!section) return [];
    const names = new Map();
    for (const match of section.matchAll(/a=rtpmap:(\d+) ([^/\s]+)/g)) names.set(match[1], match[2]);
    const payloads = section.split(/\r?\n/)[0].split(" ").slice(3);
    return [...new Set(payloads.map((pt) => names.get(pt)).filter(Boolean))];
  }

  async function stats() {
    const pc = connection && connection.session ? connection.session.pc : null;
    const out = {
      state, framesEncoded: 0, packetsSent: 0, codec: null,
      preferredVideoCodec, offeredVideoCodecs: offeredVideoCodecs(pc),
    };
    if (!pc) return out;
    const report = await pc.getStats();
    Object.assign(out, sc.selectedPair(report));
    report.forEach((s) => {
      if (s.type === "outbound-rtp" && s.kind === "video") {
        out.framesEncoded += s.framesEncoded || 0;
        out.packetsSent += s.packetsSent || 0;
        const codec = s.codecId && report.get(s.codecId);
        if (codec) out.codec = codec.mimeType;
        if (s.frameWidth) Object.assign(out, { frameWidth: s.frameWidth, frameHeight: s.frameHeight });
      }
    });
    return out;
  }

  // ---- wiring -------------------------------------------------------------------------------

  ui.roomName.textContent = room ? `room ${room}` : "no room in the link";
  document.title = `Teach ${room} · skyclass`;
  ui.previewBtn.addEventListener("click", () => ensureMedia());
  ui.start.addEventListener("click", start);
  ui.stop.addEventListener("click", stop);
  for (const input of sourceInputs) {
    input.addEventListener("change", async () => {
      // Switching source while previewing or live swaps the tracks in place.
      if (media && !(await ensureMedia())) {
        // Keep showing what is actually being used.
        for (const other of sourceInputs) other.checked = other.value === mediaSource;
      }
    });
  }
  // Tell the server right away when the tab closes, instead of waiting for ICE consent to expire.
  window.addEventListener("pagehide", () => {
    if (connection) connection.stop({ keepalive: true });
  });

  Object.assign(window.skyclass, { state: () => state, stats });
  setState("idle");
  if (!token) showMessage("This link has no token. Open the teacher link you were given (it ends in ?token=…).", "error");
  pollRoom();
  setInterval(pollRoom, 2000);
})();
