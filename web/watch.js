/*
 * Watch page: receive the room's lesson over WHEP and keep receiving it.
 *
 * The page connects even before the teacher is live (the server starts forwarding when the
 * lesson starts) and reconnects by itself, with backoff, whenever the connection or the POST
 * fails. Nothing here polls the server: with thousands of students per room, the page judges
 * "live" vs "waiting" from its own receive statistics.
 *
 * window.skyclass.state() → "connecting" | "waiting" | "live" | "reconnecting" | "error"
 * window.skyclass.stats() → inbound video figures of the current connection (reset on reconnect).
 */
(function () {
  "use strict";

  const sc = window.skyclass;
  const room = sc.roomFromPath();
  const token = sc.tokenFromQuery();
  const $ = (id) => document.getElementById(id);
  const ui = {
    player: $("player"), video: $("video"), speaker: $("speaker"), note: $("note"), status: $("status"),
    statusText: $("status-text"), roomName: $("room-name"), unmute: $("unmute"), fullscreen: $("fullscreen"),
  };
  const LABELS = {
    connecting: "Connecting", waiting: "Waiting", live: "Live", reconnecting: "Reconnecting", error: "Error",
  };
  // No new frame for this long while connected means the teacher is not (or no longer) sending.
  const STALL_MS = 3000;

  let state = "connecting";
  let connection = null;
  let remote = null; // MediaStream of the current session: the teacher
  let speakerStream = null; // whoever has the floor (a student who speaks), if anyone
  let slots = null; // this session's transceivers: main and speaker
  let lastError = null;
  let reconnects = 0;
  let lastFrames = 0;
  let lastProgressAt = 0;

  function setState(next, text) {
    state = next;
    ui.status.dataset.state = next;
    ui.status.textContent = LABELS[next];
    // While the lesson plays the picture speaks for itself (the bottom bar shows the resolution);
    // otherwise the note in the middle says what is going on.
    ui.statusText.textContent = "";
    ui.note.classList.toggle("hidden", next === "live");
    if (text) ui.note.textContent = text;
    if (next !== "live") showControls();
  }

  // ---- connection ---------------------------------------------------------------------------

  function prepare(pc) {
    remote = new MediaStream();
    speakerStream = new MediaStream();
    lastFrames = 0;
    // The first audio/video pair receives the teacher; the second pair is the room's speaker
    // slot (a student given the floor), pre-allocated so a new speaker needs no renegotiation.
    slots = {
      audio: pc.addTransceiver("audio", { direction: "recvonly" }),
      video: pc.addTransceiver("video", { direction: "recvonly" }),
      speakerAudio: pc.addTransceiver("audio", { direction: "recvonly" }),
      speakerVideo: pc.addTransceiver("video", { direction: "recvonly" }),
    };
    // No srcObject until a track arrives: a media element with an empty stream delays the
    // page's load event indefinitely.
    ui.speaker.srcObject = null;
    ui.speaker.classList.add("hidden");
  }

  function onSpeakerTrack(track) {
    speakerStream.addTrack(track);
    if (ui.speaker.srcObject !== speakerStream) ui.speaker.srcObject = speakerStream;
    // A slot's track is muted while nobody speaks and unmutes when RTP flows.
    const show = () => {
      const live = speakerStream.getTracks().some((t) => !t.muted);
      ui.speaker.classList.toggle("hidden", !live || !speakerStream.getVideoTracks().some((t) => !t.muted));
      if (live) ui.speaker.play().catch(() => {});
    };
    track.addEventListener("unmute", show);
    track.addEventListener("mute", show);
  }

  function onTrack(event) {
    if (slots && (event.transceiver === slots.speakerAudio || event.transceiver === slots.speakerVideo)) {
      onSpeakerTrack(event.track);
      return;
    }
    remote.addTrack(event.track);
    if (ui.video.srcObject !== remote) {
      ui.video.srcObject = remote;
      // autoplay normally starts it; play() also covers browsers that wait for metadata.
      ui.video.play().catch(() => {});
    }
  }

  function onConnectionState(next, detail) {
    if (next === "connecting") {
      setState(detail ? "reconnecting" : "connecting", detail ? "Reconnecting…" : "Connecting…");
    } else if (next === "connected") {
      lastError = null;
      lastProgressAt = performance.now();
      setState("waiting", "Connected. Waiting for the teacher to start the lesson…");
    } else if (next === "retrying") {
      reconnects += 1;
      const why = lastError ? lastError.reason : "connection lost";
      setState("reconnecting", `${why} — trying again in ${Math.ceil(detail / 1000)} s`);
    } else if (next === "error") {
      setState("error", `Cannot watch: ${detail.reason}`);
    }
  }

  function connect() {
    if (!token) {
      setState("error", "This link has no token. Open the lesson link you were given (it ends in ?token=…).");
      return;
    }
    connection = new sc.Connection({
      kind: "whep", room, token, prepare, onTrack,
      onState: onConnectionState,
      onError: (err) => { lastError = err; },
    });
    connection.start();
  }

  // ---- statistics ---------------------------------------------------------------------------

  async function stats() {
    const pc = connection && connection.session ? connection.session.pc : null;
    const out = {
      state, connectionState: pc ? pc.connectionState : "new", reconnects,
      framesDecoded: 0, framesDropped: 0, packetsReceived: 0, packetsLost: 0, bytesReceived: 0,
      framesPerSecond: 0, frameWidth: 0, frameHeight: 0, jitter: 0, codec: null,
      audioPacketsReceived: 0, speakerAudioPacketsReceived: 0, speakerFramesDecoded: 0,
    };
    if (!pc) return out;
    const report = await pc.getStats();
    Object.assign(out, sc.selectedPair(report));
    report.forEach((s) => {
      if (s.type !== "inbound-rtp") return;
      // The teacher's m-lines only; the speaker slot has figures of its own.
      const main = slots && (s.mid === slots.audio.mid || s.mid === slots.video.mid);
      if (slots && !main) {
        if (s.kind === "audio") out.speakerAudioPacketsReceived += s.packetsReceived || 0;
        else out.speakerFramesDecoded += s.framesDecoded || 0;
        return;
      }
      if (s.kind === "audio") {
        out.audioPacketsReceived += s.packetsReceived || 0;
        return;
      }
      if (s.kind !== "video") return;
      out.framesDecoded += s.framesDecoded || 0;
      out.framesDropped += s.framesDropped || 0;
      out.packetsReceived += s.packetsReceived || 0;
      out.packetsLost += s.packetsLost || 0;
      out.bytesReceived += s.bytesReceived || 0;
      out.framesPerSecond = s.framesPerSecond || out.framesPerSecond;
      out.frameWidth = s.frameWidth || out.frameWidth;
      out.frameHeight = s.frameHeight || out.frameHeight;
      out.jitter = s.jitter || out.jitter;
      const codec = s.codecId && report.get(s.codecId);
      if (codec) out.codec = codec.mimeType;
    });
    return out;
  }

  /** Once a second: is the picture moving? That decides "live" versus "waiting". */
  async function watchProgress() {
    if (!connection || !connection.session || (state !== "waiting" && state !== "live")) return;
    const now = performance.now();
    const figures = await stats();
    if (figures.framesDecoded > lastFrames) {
      lastFrames = figures.framesDecoded;
      lastProgressAt = now;
      if (state !== "live") setState("live", "");
      ui.statusText.textContent = figures.frameHeight ? `${figures.frameHeight}p` : "";
    } else if (state === "live" && now - lastProgressAt > STALL_MS) {
      setState("waiting", "The teacher's video has paused. It resumes here automatically.");
    }
  }

  // ---- controls -----------------------------------------------------------------------------

  // Inline SVG rather than emoji: many TVs, old PCs and headless browsers have no emoji font.
  const svg = (paths) => `<svg viewBox="0 0 24 24" aria-hidden="true" fill="none" stroke="currentColor"
    stroke-width="2" stroke-linecap="round" stroke-linejoin="round">${paths}</svg>`;
  const SPEAKER = '<path d="M4 9h4l5-4v14l-5-4H4z" fill="currentColor"/>';
  const ICONS = {
    muted: svg(`${SPEAKER}<path d="M17 9.5l5 5M22 9.5l-5 5"/>`),
    sound: svg(`${SPEAKER}<path d="M16.5 9a4.5 4.5 0 0 1 0 6M19 6.5a8 8 0 0 1 0 11"/>`),
    enter: svg('<path d="M4 9V4h5M15 4h5v5M20 15v5h-5M9 20H4v-5"/>'),
    exit: svg('<path d="M9 4v5H4M20 9h-5V4M15 20v-5h5M4 15h5v5"/>'),
  };
  function setButton(button, icon, label) {
    button.innerHTML = `${ICONS[icon]}<span class="label">${label}</span>`;
  }

  function setMuted(muted) {
    ui.video.muted = muted;
    ui.speaker.muted = muted;
    setButton(ui.unmute, muted ? "muted" : "sound", muted ? "Unmute" : "Mute");
    ui.unmute.classList.toggle("attention", muted);
    ui.unmute.setAttribute("aria-pressed", String(!muted));
  }

  ui.unmute.addEventListener("click", () => {
    setMuted(!ui.video.muted);
    // A click is the user gesture browsers require before playing sound.
    ui.video.play().catch(() => {});
    ui.speaker.play().catch(() => {});
  });

  const fullscreenElement = () => document.fullscreenElement || document.webkitFullscreenElement;

  async function toggleFullscreen() {
    if (fullscreenElement()) {
      await (document.exitFullscreen || document.webkitExitFullscreen).call(document);
      return;
    }
    const el = ui.player;
    const request = el.requestFullscreen || el.webkitRequestFullscreen;
    if (request) {
      await request.call(el).catch(() => {});
      // Phones: a lesson is wide; turn it sideways if the browser lets us (most only do in fullscreen).
      if (screen.orientation && screen.orientation.lock) screen.orientation.lock("landscape").catch(() => {});
    } else if (ui.video.webkitEnterFullscreen) {
      // iPhone Safari only lets the <video> element itself go full screen.
      ui.video.webkitEnterFullscreen();
    }
  }

  function onFullscreenChange() {
    const full = Boolean(fullscreenElement());
    setButton(ui.fullscreen, full ? "exit" : "enter", full ? "Exit full screen" : "Full screen");
  }

  ui.fullscreen.addEventListener("click", () => toggleFullscreen());
  ui.video.addEventListener("dblclick", () => toggleFullscreen());
  document.addEventListener("fullscreenchange", onFullscreenChange);
  document.addEventListener("webkitfullscreenchange", onFullscreenChange);

  // Controls fade out during the lesson and come back on any touch, mouse move or key.
  let hideTimer = null;
  function showControls() {
    ui.player.classList.remove("idle-ui");
    clearTimeout(hideTimer);
    hideTimer = setTimeout(() => {
      if (state === "live") ui.player.classList.add("idle-ui");
    }, 3500);
  }
  for (const type of ["pointermove", "pointerdown", "keydown", "touchstart"]) {
    document.addEventListener(type, showControls, { passive: true });
  }

  // ---- start ----------------------------------------------------------------------------------

  ui.roomName.textContent = room ? `room ${room}` : "";
  document.title = `${room || "Lesson"} · skyclass`;
  window.addEventListener("pagehide", () => {
    if (connection) connection.stop({ keepalive: true });
    connection = null;
  });
  // Coming back from the back/forward cache: the old session was ended on pagehide.
  window.addEventListener("pageshow", (event) => {
    if (event.persisted && !connection) connect();
  });
  Object.assign(window.skyclass, { state: () => state, stats });
  setState("connecting", "Connecting…");
  setMuted(true);
  onFullscreenChange();
  connect();
  setInterval(() => { watchProgress().catch(() => {}); }, 1000);
})();
