/*
 * skyclass.js — a small WHIP/WHEP client shared by the teach and watch pages.
 *
 * Plain script, no build step: it defines `window.skyclass` as a namespace; the pages
 * add their own `state()` (and, on the watch page, `stats()`) to it for tests and debugging.
 *
 * Protocol notes (see design.md):
 *  - POST an SDP offer with `Authorization: Bearer TOKEN` → 201, `Location`, answer SDP.
 *  - The server does not support trickle ICE (PATCH answers 405), so every candidate must
 *    be in the offer: we wait for ICE gathering to complete before POSTing.
 *  - DELETE on the Location ends the session.
 *  - Errors are `text/plain` reasons; 503 carries `Retry-After`.
 */
(function () {
  "use strict";

  /** A non-2xx answer from WHIP/WHEP, or a network failure (status 0). */
  class SignallingError extends Error {
    constructor(status, reason, retryAfterMs) {
      super(status ? `${status}: ${reason}` : reason);
      this.name = "SignallingError";
      this.status = status;
      this.reason = reason;
      this.retryAfterMs = retryAfterMs; // null when the server did not say
    }

    /** Retrying cannot help: the request itself (or its token) is wrong. */
    get fatal() {
      return [400, 401, 403, 415].includes(this.status);
    }
  }

  /** Room name from the page path: /teach/{room} or /watch/{room}. */
  function roomFromPath(pathname = location.pathname) {
    const parts = pathname.split("/").filter(Boolean);
    return parts.length >= 2 ? decodeURIComponent(parts[parts.length - 1]) : "";
  }

  /** Token from the page URL: ?token=... */
  function tokenFromQuery(search = location.search) {
    return new URLSearchParams(search).get("token") || "";
  }

  /** Retry-After is either delay-seconds or an HTTP date (RFC 9110 §10.2.3). */
  function parseRetryAfter(value) {
    if (!value) return null;
    const seconds = Number(value.trim());
    if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
    const date = Date.parse(value);
    return Number.isNaN(date) ? null : Math.max(0, date - Date.now());
  }

  /**
   * Exponential backoff with jitter (so a classroom of students that lost the server at the
   * same moment does not come back at the same moment), honouring Retry-After when given.
   */
  function backoffDelay(attempt, retryAfterMs = null, baseMs = 1000, maxMs = 15000) {
    if (retryAfterMs != null) return retryAfterMs + Math.random() * 1000;
    const ceiling = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 10));
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      if (signal) signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
    });
  }

  /**
   * Resolve when ICE gathering is complete. Without STUN/TURN servers this takes a few
   * milliseconds; the timeout only guards against an interface that never finishes, in which
   * case we send the candidates gathered so far (they are already in localDescription).
   */
  function waitForIceGathering(pc, timeoutMs = 5000) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        pc.removeEventListener("icegatheringstatechange", check);
        resolve();
      };
      const check = () => { if (pc.iceGatheringState === "complete") done(); };
      const timer = setTimeout(done, timeoutMs);
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  /**
   * Create the offer, wait for every candidate, POST it to the WHIP/WHEP endpoint.
   * Returns {url, answer}: the absolute session URL (from Location) and the answer SDP.
   * Throws SignallingError on any failure.
   */
  async function postOffer(pc, endpoint, token) {
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc);
    let response;
    try {
      response = await fetch(endpoint, {
        method: "POST",
        headers: { "Content-Type": "application/sdp", Authorization: `Bearer ${token}` },
        body: pc.localDescription.sdp,
      });
    } catch (err) {
      throw new SignallingError(0, `cannot reach the server (${err.message})`, null);
    }
    const body = await response.text();
    if (response.status !== 201) {
      throw new SignallingError(response.status, body.trim() || response.statusText,
                                parseRetryAfter(response.headers.get("Retry-After")));
    }
    const where = response.headers.get("Location");
    // Location is relative (/whip/{room}/{session}); resolve it against the endpoint.
    const url = where ? new URL(where, new URL(endpoint, location.href)).href : null;
    return { url, answer: body };
  }

  /** End a session. `keepalive` lets the request outlive the page (pagehide). */
  async function endSession(sessionUrl, token, { keepalive = false } = {}) {
    if (!sessionUrl) return;
    try {
      await fetch(sessionUrl, { method: "DELETE", headers: { Authorization: `Bearer ${token}` }, keepalive });
    } catch (err) {
      // The server drops the session anyway once ICE consent expires.
      console.warn("skyclass: DELETE failed", err);
    }
  }

  /**
   * One WHIP or WHEP session: a peer connection, set up by `prepare(pc)` (add tracks or
   * transceivers), negotiated with the server. `onConnectionState(state)` is called on every
   * change so the page can decide what a failure means for it.
   */
  class Session {
    constructor({ kind, room, token, prepare, onConnectionState, onTrack }) {
      this.kind = kind; // "whip" | "whep"
      this.room = room;
      this.token = token;
      this.endpoint = `/${kind}/${encodeURIComponent(room)}`;
      // No STUN: the server offers its own host candidates and media stays local to them.
      this.pc = new RTCPeerConnection({ iceServers: [], bundlePolicy: "max-bundle" });
      this.url = null;
      this.closed = false;
      if (onTrack) this.pc.addEventListener("track", onTrack);
      if (onConnectionState) {
        this.pc.addEventListener("connectionstatechange", () => {
          if (!this.closed) onConnectionState(this.pc.connectionState);
        });
      }
      prepare(this.pc);
    }

    async start() {
      const { url, answer } = await postOffer(this.pc, this.endpoint, this.token);
      // Remember the session before applying the answer: if that fails, stop() still DELETEs it.
      this.url = url;
      if (this.closed) {
        // stop() ran while the POST was in flight; end what the server just created.
        await endSession(url, this.token);
        throw new SignallingError(0, "stopped", null);
      }
      await this.pc.setRemoteDescription({ type: "answer", sdp: answer });
      return this;
    }

    /** DELETE on the server, then close locally. Safe to call more than once. */
    async stop({ keepalive = false } = {}) {
      if (this.closed) return;
      this.closed = true;
      const url = this.url;
      this.url = null;
      this.pc.close();
      await endSession(url, this.token, { keepalive });
    }
  }

  /**
   * Keeps one Session connected until stop(): retries a failed POST with backoff (honouring
   * Retry-After), and replaces the session when its connection fails, closes, stays
   * "disconnected" past a grace period, or never connects. Fatal errors (bad token, bad
   * request) stop it: retrying would only hammer the server with the same mistake.
   *
   * onState(state, detail) receives "connecting" | "connected" | "retrying" (detail: delay ms)
   * | "error" (detail: the error) | "idle"; onError(err) every failure worth showing.
   */
  class Connection {
    constructor({ kind, room, token, prepare, onTrack, onState, onError,
                  disconnectGraceMs = 3000, connectTimeoutMs = 20000 }) {
      Object.assign(this, { kind, room, token, prepare, onTrack, disconnectGraceMs, connectTimeoutMs });
      this.onState = onState || (() => {});
      this.onError = onError || (() => {});
      this.session = null;
      this.running = false;
      this._abort = null;
    }

    start() {
      if (this.running) return;
      this.running = true;
      this._abort = new AbortController();
      this._loop();
    }

    async stop({ keepalive = false } = {}) {
      this.running = false;
      if (this._abort) this._abort.abort();
      const session = this.session;
      this.session = null;
      if (session) await session.stop({ keepalive });
      this.onState("idle");
    }

    async _loop() {
      const signal = this._abort.signal;
      let attempt = 0;
      // The signal, not this.running, decides: after stop() + start() a new loop owns the connection.
      while (!signal.aborted) {
        this.onState("connecting", attempt);
        let settle;
        const ended = new Promise((resolve) => { settle = resolve; });
        let connected = false;
        let graceTimer = null;
        const session = new Session({
          kind: this.kind, room: this.room, token: this.token, prepare: this.prepare, onTrack: this.onTrack,
          onConnectionState: (state) => {
            clearTimeout(graceTimer);
            if (state === "connected") {
              connected = true;
              attempt = 0;
              this.onState("connected");
            } else if (state === "failed" || state === "closed") {
              settle(state);
            } else if (state === "disconnected") {
              // "disconnected" often heals by itself within a second or two (a lost burst of
              // consent checks); "failed" follows if it does not. Do not wait that long.
              graceTimer = setTimeout(() => settle("disconnected"), this.disconnectGraceMs);
            }
          },
        });
        this.session = session;
        let error = null;
        try {
          await session.start();
          const timer = setTimeout(() => { if (!connected) settle("timed out"); }, this.connectTimeoutMs);
          if (signal.aborted) settle("stopped");
          else signal.addEventListener("abort", () => settle("stopped"), { once: true });
          const reason = await ended;
          clearTimeout(timer);
          clearTimeout(graceTimer);
          if (reason !== "stopped") error = new SignallingError(0, `connection ${reason}`, null);
        } catch (err) {
          error = err instanceof SignallingError ? err : new SignallingError(0, err.message || String(err), null);
        }
        if (this.session === session) this.session = null;
        // url is null after a failed POST, so this only DELETEs a session the server knows.
        await session.stop();
        if (signal.aborted) return;
        this.onError(error);
        if (error.fatal) {
          this.running = false;
          this.onState("error", error);
          return;
        }
        const delay = backoffDelay(connected ? 0 : attempt, error.retryAfterMs);
        attempt += 1;
        this.onState("retrying", delay);
        await sleep(delay, signal);
      }
    }
  }

  /**
   * Video codec preferences for a sending transceiver: H.264 first (packetization-mode=1,
   * constrained baseline before the rest) so the room can be recorded without transcoding,
   * then VP8, then the helpers (rtx, red, ulpfec) the browser wants to keep.
   * Returns null when the browser cannot encode H.264 or cannot set preferences.
   */
  function h264First(kind = "video") {
    if (!("setCodecPreferences" in RTCRtpTransceiver.prototype)) return null;
    const caps = RTCRtpSender.getCapabilities && RTCRtpSender.getCapabilities(kind);
    if (!caps) return null;
    const fmtp = (c) => c.sdpFmtpLine || "";
    const mime = (c) => c.mimeType.toLowerCase();
    const h264 = caps.codecs.filter((c) => mime(c) === "video/h264" && /packetization-mode=1/.test(fmtp(c)));
    if (!h264.length) return null;
    const rank = (c) => (/profile-level-id=42e0/.test(fmtp(c)) ? 0 : /profile-level-id=4200/.test(fmtp(c)) ? 1 : 2);
    h264.sort((a, b) => rank(a) - rank(b));
    const vp8 = caps.codecs.filter((c) => mime(c) === "video/vp8");
    const helpers = caps.codecs.filter((c) => ["video/rtx", "video/red", "video/ulpfec"].includes(mime(c)));
    return [...h264, ...vp8, ...helpers];
  }

  /** GET /api/rooms/{room} → {room, live, publisher, viewers, codecs, started_at}. */
  async function roomState(room) {
    const response = await fetch(`/api/rooms/${encodeURIComponent(room)}`, { cache: "no-store" });
    if (!response.ok) throw new Error(`room state: HTTP ${response.status}`);
    return response.json();
  }

  /** Addresses of the candidate pair carrying the media, from a getStats() report. */
  function selectedPair(report) {
    let pair = null;
    report.forEach((s) => {
      if (s.type === "transport" && s.selectedCandidatePairId) pair = report.get(s.selectedCandidatePairId);
    });
    if (!pair) return { localAddress: null, remoteAddress: null };
    const local = report.get(pair.localCandidateId) || {};
    const remote = report.get(pair.remoteCandidateId) || {};
    return { localAddress: local.address || null, remoteAddress: remote.address || null };
  }

  /** A DOM element: ``props`` assigned to it, ``children`` (nodes or strings; null skipped) appended. */
  function el(tag, props, children) {
    const node = Object.assign(document.createElement(tag), props || {});
    for (const child of children || []) if (child != null) node.append(child);
    return node;
  }

  /** Human-readable codec name from a mime type ("video/H264" → "H264"). */
  function codecName(mimeType) {
    return mimeType ? mimeType.split("/").pop() : "";
  }

  window.skyclass = Object.assign(window.skyclass || {}, {
    SignallingError,
    Session,
    Connection,
    roomFromPath,
    tokenFromQuery,
    parseRetryAfter,
    backoffDelay,
    sleep,
    waitForIceGathering,
    postOffer,
    endSession,
    h264First,
    roomState,
    selectedPair,
    codecName,
    el,
  });
})();
