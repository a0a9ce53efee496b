/*
 * replay.js — plays a recorded lesson: /replay/{id}.
 *
 * H.264 lessons are HLS with fMP4 segments: Safari (macOS, iOS, iPadOS) plays them natively;
 * everywhere else hls.js (vendored in /static/vendor/) feeds them to Media Source Extensions.
 * VP8 lessons are WebM segments, which no HLS player takes: a small MSE loader below reads
 * our playlist and appends the segments itself (Chromium, Firefox, Edge; not iOS Safari).
 * While the lesson is still being recorded the playlist is an EVENT one and grows.
 *
 * Beside the video: the lesson's public Q&A (chat, answered questions, who had the floor) from
 * GET /api/recordings/{id}/history, each entry at its offset into the recording; clicking one
 * seeks there and the entries already reached are marked as the video plays. A student who
 * opened the page with a token (?token= or the one the landing page remembers) has their
 * watch time counted in the lesson's attendance: POST /api/recordings/{id}/watch with the
 * seconds actually played, every 30 s and when the page is hidden.
 *
 * window.skyclassReplay.state() reports what the player is doing (tests, debugging).
 */
(function () {
  "use strict";

  const video = document.getElementById("video");
  const message = document.getElementById("message");
  const statusPill = document.getElementById("status");
  const parts = location.pathname.split("/").filter(Boolean);
  const id = decodeURIComponent(parts[1] || "");
  const report = { engine: "none", error: null, info: null, qa: [], watch: { sent: 0, pending: 0, errors: 0 } };
  const TOKEN_STORE = "skyclass.token";  // what the landing page remembers (timetable.js)

  function say(text, kind) {
    message.textContent = text || "";
    if (kind) message.dataset.kind = kind; else delete message.dataset.kind;
  }

  function setStatus(state, text) {
    statusPill.dataset.state = state;
    statusPill.textContent = text;
  }

  function clock(seconds) {
    seconds = Math.max(0, Math.floor(seconds || 0));
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    const mm = String(m).padStart(h ? 2 : 1, "0"), ss = String(s).padStart(2, "0");
    return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
  }

  function showInfo(info) {
    document.title = `${info.title} · replay · skyclass`;
    document.getElementById("title").textContent = info.title;
    document.getElementById("room-name").textContent = info.room;
    const started = new Date(info.started_at * 1000);
    const facts = [
      info.teacher,
      started.toLocaleString([], { dateStyle: "medium", timeStyle: "short" }),
      clock(info.duration),
      info.grade ? `Grade ${info.grade}` : null,
      info.subject ? info.subject.replace(/-/g, " ") : null,
    ].filter(Boolean);
    const list = document.getElementById("facts");
    list.replaceChildren(...facts.map((text) => Object.assign(document.createElement("li"), { textContent: text })));
    const download = document.getElementById("download");
    download.href = info.download;
    download.classList.toggle("hidden", info.state === "recording");
    if (info.state === "recording") setStatus("live", "Recording");
    else setStatus("idle", info.state === "repaired" ? "Replay (recovered)" : "Replay");
  }

  // ---- WebM (VP8) over MSE -----------------------------------------------------------

  /** Our own playlists only: EXT-X-MAP, EXTINF, segment URIs, EXT-X-ENDLIST. */
  function parsePlaylist(text, base) {
    const segments = [];
    let init = null, duration = null, start = 0;
    for (const raw of text.split("\n")) {
      const line = raw.trim();
      if (line.startsWith("#EXT-X-MAP:")) init = new URL(line.match(/URI="([^"]+)"/)[1], base).href;
      else if (line.startsWith("#EXTINF:")) duration = parseFloat(line.slice(8));
      else if (line && !line.startsWith("#") && duration !== null) {
        segments.push({ url: new URL(line, base).href, init, start, duration });
        start += duration;
        duration = null;
      }
    }
    return { segments, ended: text.includes("#EXT-X-ENDLIST"), total: start };
  }

  async function playWebm(info) {
    const codecs = info.codecs.audio ? "vp8,opus" : "vp8";
    const type = `video/webm; codecs="${codecs}"`;
    if (!window.MediaSource || !MediaSource.isTypeSupported(type)) {
      throw new Error("this browser cannot play VP8 lessons: try Chrome, Edge or Firefox, or download the file");
    }
    report.engine = "mse-webm";
    const playlistUrl = new URL(info.playlist, location.href).href;
    const source = new MediaSource();
    video.src = URL.createObjectURL(source);
    await new Promise((resolve) => source.addEventListener("sourceopen", resolve, { once: true }));
    const buffer = source.addSourceBuffer(type);
    let playlist = { segments: [], ended: false, total: 0 };
    let next = 0, appendedInit = null, busy = false, wantSeek = null;

    const appended = () => new Promise((resolve, reject) => {
      buffer.addEventListener("updateend", resolve, { once: true });
      buffer.addEventListener("error", reject, { once: true });
    });
    async function append(url) {
      const resp = await fetch(url);
      if (!resp.ok) throw new Error(`${url}: HTTP ${resp.status}`);
      const data = await resp.arrayBuffer();
      const done = appended();
      buffer.appendBuffer(data);
      await done;
    }
    async function refresh() {
      const resp = await fetch(playlistUrl, { cache: "no-cache" });
      playlist = parsePlaylist(await resp.text(), playlistUrl);
      if (playlist.ended && source.readyState === "open" && !buffer.updating) source.duration = playlist.total;
    }
    function indexAt(time) {
      const i = playlist.segments.findIndex((s) => time < s.start + s.duration);
      return i < 0 ? Math.max(0, playlist.segments.length - 1) : i;
    }
    async function pump() {
      if (busy) return;
      busy = true;
      try {
        for (;;) {
          if (wantSeek !== null) {
            next = indexAt(wantSeek);
            wantSeek = null;
            appendedInit = null; // re-append the init: a seek may cross a configuration change
          }
          const ahead = video.buffered.length ? video.buffered.end(video.buffered.length - 1) - video.currentTime : 0;
          if (next >= playlist.segments.length || ahead > 30) break;
          const segment = playlist.segments[next];
          if (segment.init !== appendedInit) {
            await append(segment.init);
            appendedInit = segment.init;
          }
          await append(segment.url);
          next += 1;
        }
        if (playlist.ended && next >= playlist.segments.length && source.readyState === "open" && !buffer.updating) {
          source.endOfStream();
        }
      } catch (err) {
        fail(err);
      } finally {
        busy = false;
      }
    }

    await refresh();
    source.duration = playlist.total || 1;
    video.addEventListener("seeking", () => {
      const t = video.currentTime;
      const buffered = [...Array(video.buffered.length).keys()]
        .some((i) => video.buffered.start(i) <= t && t < video.buffered.end(i));
      if (!buffered) { wantSeek = t; pump(); }
    });
    video.addEventListener("timeupdate", pump);
    if (!playlist.ended) {
      const timer = setInterval(async () => {
        await refresh();
        if (playlist.ended) clearInterval(timer);
        pump();
      }, 4000);
    }
    await pump();
  }

  // ---- HLS (H.264) ---------------------------------------------------------------------

  function playHls(info) {
    const native = video.canPlayType("application/vnd.apple.mpegurl");
    const apple = /Apple/.test(navigator.vendor || "");
    const hlsjs = window.Hls && window.Hls.isSupported();
    if (native && (apple || !hlsjs)) {
      report.engine = "native";
      video.src = info.playlist;
      return;
    }
    if (!hlsjs) throw new Error("this browser cannot play the replay: download the file instead");
    report.engine = "hls.js";
    // A lesson still being recorded is an EVENT playlist, which hls.js would join at its live
    // edge: a student who missed the start wants the beginning.
    const start = startTime() || (info.state === "recording" ? 0 : -1);
    const hls = new window.Hls({ startPosition: start, maxBufferLength: 30, backBufferLength: 60 });
    hls.on(window.Hls.Events.ERROR, (event, data) => {
      if (!data.fatal) return;
      if (data.type === window.Hls.ErrorTypes.NETWORK_ERROR) { say("Network trouble, retrying…", "warn"); hls.startLoad(); }
      else if (data.type === window.Hls.ErrorTypes.MEDIA_ERROR) hls.recoverMediaError();
      else fail(new Error(`playback failed: ${data.details}`));
    });
    hls.loadSource(info.playlist);
    hls.attachMedia(video);
    report.hls = hls;
  }

  /** ?t=SECONDS (or #t=SECONDS) starts the replay there, e.g. from a link to a question. */
  function startTime() {
    const value = new URLSearchParams(location.search).get("t") || (location.hash.match(/t=([\d.]+)/) || [])[1];
    const t = parseFloat(value);
    return Number.isFinite(t) && t > 0 ? t : 0;
  }

  function fail(err) {
    report.error = String(err && err.message || err);
    setStatus("error", "Error");
    say(report.error, "error");
  }

  async function main() {
    if (!id) { fail(new Error("no recording in the address")); return; }
    const resp = await fetch(`/api/recordings/${encodeURIComponent(id)}`);
    if (!resp.ok) { fail(new Error(resp.status === 404 ? "This recording does not exist." : `HTTP ${resp.status}`)); return; }
    const info = await resp.json();
    report.info = info;
    showInfo(info);
    if (info.state === "recording") say("The lesson is still going on: you are watching it from the beginning.");
    loadQa(info).catch((err) => console.warn("replay: no Q&A", err));
    countWatchTime(info);
    if (info.container === "webm") await playWebm(info); else playHls(info);
    const t = startTime();
    if (report.engine !== "hls.js" && (t || info.state === "recording")) {
      video.addEventListener("loadedmetadata", () => { video.currentTime = t; }, { once: true });
    }
    video.addEventListener("error", () => video.error && fail(new Error(`video error ${video.error.code}: ${video.error.message}`)));
  }

  // ---- the lesson's Q&A beside the video -------------------------------------------------

  const el = window.skyclass.el;  // skyclass.js

  /** One history entry as the replay shows it, or null for what a replay has no use for. */
  function describe(entry) {
    switch (entry.type) {
      case "chat":
        return { who: entry.name, text: entry.text, kind: "chat" };
      case "answered": {
        const q = entry.question || {};
        return { who: q.name, text: q.text, answer: q.answer || "answered", kind: "question" };
      }
      case "floor":
        return entry.holder
          ? { who: entry.holder, text: "was given the floor", kind: "floor" }
          : { who: entry.taken_from || "", text: "no longer has the floor", kind: "floor" };
      case "lesson":
        if (entry.state === "live") return { who: "", text: "The lesson started", kind: "lesson" };
        if (entry.state === "ended") return { who: "", text: "The lesson ended", kind: "lesson" };
        return null;
      default:
        return null;
    }
  }

  async function loadQa(info) {
    const panel = document.getElementById("qa");
    const list = document.getElementById("qa-list");
    const resp = await fetch(`/api/recordings/${encodeURIComponent(info.id)}/history`, { cache: "no-store" });
    if (!resp.ok) { panel.dataset.state = "unavailable"; return; }
    const body = await resp.json();
    const items = [];
    for (const entry of body.entries) {
      const shown = describe(entry);
      if (!shown) continue;
      const at = Math.max(0, entry.offset);
      const jump = el("button", { type: "button", className: "qa-time", textContent: clock(at),
                                  title: "Play from here" });
      jump.addEventListener("click", () => { video.currentTime = at; video.play().catch(() => {}); });
      const parts = [jump];
      if (shown.who) parts.push(el("strong", { textContent: shown.who }));
      parts.push(el("span", { className: "qa-text", textContent: shown.text }));
      if (shown.answer) parts.push(el("span", { className: "qa-answer", textContent: `Answer: ${shown.answer}` }));
      const item = el("li", { className: `qa-${shown.kind}` }, parts);
      item.dataset.offset = String(at);
      items.push(item);
      report.qa.push({ offset: at, kind: shown.kind, who: shown.who, text: shown.text, answer: shown.answer || null });
    }
    list.replaceChildren(...items);
    panel.dataset.state = items.length ? "ready" : "empty";
    document.getElementById("qa-empty").classList.toggle("hidden", items.length > 0);
    const mark = () => {
      for (const item of items) item.classList.toggle("qa-past", parseFloat(item.dataset.offset) <= video.currentTime);
    };
    video.addEventListener("timeupdate", mark);
    mark();
  }

  // ---- watch time for the lesson's attendance ---------------------------------------------

  function watchToken() {
    const fromUrl = new URLSearchParams(location.search).get("token");
    if (fromUrl) return fromUrl;
    try { return localStorage.getItem(TOKEN_STORE) || ""; } catch (err) { return ""; }
  }

  /** Counts the seconds actually played (not paused, not the seek jumps) and reports them. */
  function countWatchTime(info) {
    const token = watchToken();
    if (!token) return;
    let last = null;
    video.addEventListener("timeupdate", () => {
      const now = video.currentTime;
      if (last !== null && !video.paused && !video.seeking) {
        const step = now - last;
        if (step > 0 && step < 2) report.watch.pending += step / (video.playbackRate || 1);
      }
      last = now;
    });
    video.addEventListener("seeking", () => { last = null; });
    const flush = (keepalive) => {
      const seconds = Math.min(300, Math.round(report.watch.pending * 10) / 10);
      if (seconds < 1) return;
      report.watch.pending -= seconds;
      fetch(`/api/recordings/${encodeURIComponent(info.id)}/watch`, {
        method: "POST", keepalive,
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
        body: JSON.stringify({ seconds }),
      }).then((resp) => {
        if (resp.ok) report.watch.sent += seconds; else report.watch.errors += 1;
      }).catch(() => { report.watch.errors += 1; });
    };
    setInterval(() => flush(false), 30000);
    addEventListener("pagehide", () => flush(true));
    document.addEventListener("visibilitychange", () => { if (document.visibilityState === "hidden") flush(true); });
    report.watch.flush = () => flush(false);
  }

  window.skyclassReplay = {
    state() {
      return {
        engine: report.engine,
        error: report.error,
        currentTime: video.currentTime,
        duration: video.duration,
        paused: video.paused,
        readyState: video.readyState,
        buffered: [...Array(video.buffered.length).keys()].map((i) => [video.buffered.start(i), video.buffered.end(i)]),
        recording: report.info && report.info.id,
        qa: report.qa,
        watch: { sent: report.watch.sent, pending: report.watch.pending, errors: report.watch.errors },
      };
    },
    /** Report the watch time now instead of at the next 30 s tick (tests, debugging). */
    flushWatchTime() { if (report.watch.flush) report.watch.flush(); },
  };

  main().catch(fail);
})();
