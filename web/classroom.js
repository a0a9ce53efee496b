/*
 * classroom.js — the room's events on the teach and watch pages: questions, hands, the floor,
 * chat, presence; and, for a student given the floor, speaking into the room.
 *
 * It fills an element with id="classroom" and talks to the websocket /ws/{room}?token= (see
 * server/events.py for the messages). The server says who we are in its "welcome": staff
 * (teacher, assistant, ops) get the question queue, hands, floor control and the attendance
 * count; students get ask-a-question, raise hand, answers, chat and the "you are speaking" state.
 *
 * Speaking: when the teacher gives this student the floor, the page takes the microphone
 * (the camera too if the student turns it on) and publishes it with WHIP to /whip/{room} with
 * the student's own token; the server accepts it only while the student holds the floor and
 * ends it when the floor is taken. The teacher's page listens to whoever has the floor with a
 * WHEP session whose first (teacher) m-lines are inactive and whose second ones receive the
 * speaker slot.
 *
 * window.skyclass.classroom → { state(), send(msg), speaking(), speakerStats() } for tests.
 */
(function () {
  "use strict";

  const root = document.getElementById("classroom");
  const sc = window.skyclass;
  if (!root || !sc) return;
  const room = sc.roomFromPath();
  const token = sc.tokenFromQuery();
  if (!room || !token) return;

  const MIC = { echoCancellation: true, noiseSuppression: true, autoGainControl: true };
  const MAX_TEXT = 500;
  const MAX_ITEMS = 200;

  const model = {
    you: null, kind: "qa", lesson: null, scope: null, live: null, floor: null, presence: null,
    questions: new Map(), hands: [], chat: [], handUp: false, status: "connecting", closedReason: null,
    attendance: null, error: "",
  };
  let ws = null;
  let attempts = 0;
  let stopped = false;

  // ---- DOM helpers ---------------------------------------------------------------------------

  const el = window.skyclass.el;  // skyclass.js

  function time(ts) {
    return new Date(ts * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  // ---- the websocket ----------------------------------------------------------------------------

  function connect() {
    if (stopped) return;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/ws/${encodeURIComponent(room)}?token=${encodeURIComponent(token)}`);
    ws = socket;
    let opened = false;
    socket.addEventListener("open", () => { opened = true; attempts = 0; });
    socket.addEventListener("message", (event) => {
      let msg;
      try { msg = JSON.parse(event.data); } catch (err) { return; }
      handle(msg);
    });
    socket.addEventListener("close", (event) => {
      if (ws !== socket) return;
      ws = null;
      // 4403: removed or token revoked; 4000: the lesson's time is over; 1008: misbehaving.
      if ([4403, 4000, 1008].includes(event.code)) {
        stopped = true;
        model.status = "closed";
        model.closedReason = event.reason || model.closedReason || "disconnected";
        stopSpeaking();
        stopListening();
        render();
        return;
      }
      attempts += 1;
      model.status = "reconnecting";
      if (!opened && attempts >= 4) model.error = "Cannot join the room's events (closed room or invalid link?).";
      render();
      setTimeout(connect, sc.backoffDelay(attempts));
    });
  }

  function send(msg) {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify(msg));
      return true;
    }
    return false;
  }

  function handle(msg) {
    switch (msg.type) {
      case "welcome":
        Object.assign(model, {
          you: msg.you, kind: msg.kind, lesson: msg.lesson, scope: msg.scope, live: msg.live, floor: msg.floor,
          presence: msg.presence || model.presence, status: "open", error: "",
        });
        model.questions = new Map((msg.questions || []).map((q) => [q.id, q]));
        model.chat = (msg.history || []).filter((e) => e.type === "chat");
        model.hands = msg.hands || [];
        model.handUp = Boolean(msg.hand);
        build();
        floorChanged();
        if (model.you.staff) refreshAttendance();
        break;
      case "chat":
        model.chat.push(msg);
        if (model.chat.length > MAX_ITEMS) model.chat.shift();
        break;
      case "question":
      case "answered":
        model.questions.set(msg.question.id, msg.question);
        break;
      case "questions":
        model.questions = new Map(msg.questions.map((q) => [q.id, q]));
        break;
      case "hand":
        if (model.you && msg.name === model.you.name) model.handUp = msg.raised;
        model.hands = model.hands.filter((h) => h.name !== msg.name);
        if (msg.raised) model.hands.push({ name: msg.name, ts: msg.ts });
        break;
      case "floor":
        model.floor = msg.holder ? { holder: msg.holder, muted: Boolean(msg.muted), by: msg.by } : null;
        floorChanged();
        break;
      case "mute":
        if (model.floor && model.floor.holder === msg.name) model.floor.muted = msg.muted;
        applyMute();
        break;
      case "presence":
        model.presence = msg;
        break;
      case "lesson":
        model.live = msg.state === "live" ? msg : null;
        if (msg.state === "closed" || msg.state === "ended") {
          model.floor = null;
          floorChanged();
        }
        break;
      case "kicked":
        if (model.you && msg.name === model.you.name) {
          model.closedReason = "The teacher removed you from this lesson.";
          stopSpeaking();
        }
        break;
      case "error":
        model.error = msg.detail || msg.error;
        if (msg.error === "revoked") model.closedReason = "This link has been revoked.";
        clearTimeout(handle.errorTimer);
        handle.errorTimer = setTimeout(() => { model.error = ""; render(); }, 6000);
        break;
      default:
        return;
    }
    render();
  }

  // ---- speaking (a student given the floor) ------------------------------------------------------

  let speaker = null; // { session, stream, camera }
  let speakError = "";

  function iHaveTheFloor() {
    return Boolean(model.you && model.floor && model.floor.holder === model.you.name && !model.you.staff);
  }

  async function startSpeaking(camera = false) {
    if (speaker) return;
    speakError = "";
    const current = { session: null, stream: null, camera };
    speaker = current;
    render();
    try {
      if (!navigator.mediaDevices) throw new Error("this page needs https (or localhost) to use the microphone");
      current.stream = await navigator.mediaDevices.getUserMedia({ audio: MIC, video: camera });
      if (speaker !== current) throw new Error("stopped");
      applyMute();
      const session = new sc.Session({
        kind: "whip", room, token,
        prepare: (pc) => {
          for (const track of current.stream.getTracks()) {
            pc.addTransceiver(track, { direction: "sendonly", streams: [current.stream] });
          }
        },
        onConnectionState: (state) => {
          if ((state === "failed" || state === "closed") && speaker === current) {
            speakError = "Your microphone connection was lost.";
            stopSpeaking();
          }
        },
      });
      current.session = session;
      await session.start();
    } catch (err) {
      if (speaker === current) {
        speakError = err.reason || err.message || String(err);
        stopSpeaking();
      }
    }
    render();
  }

  function stopSpeaking() {
    const current = speaker;
    speaker = null;
    if (!current) return;
    if (current.session) current.session.stop().catch(() => {});
    if (current.stream) for (const track of current.stream.getTracks()) track.stop();
    render();
  }

  function applyMute() {
    if (!speaker || !speaker.stream) return;
    const muted = Boolean(model.floor && model.floor.muted);
    for (const track of speaker.stream.getAudioTracks()) track.enabled = !muted;
  }

  // ---- listening (the teacher hears whoever has the floor) -----------------------------------------

  let listener = null; // sc.Connection receiving the speaker slot
  let listenerStream = null;

  function startListening() {
    if (listener) return;
    listenerStream = new MediaStream();
    const media = root.querySelector(".cr-speaker-media");
    listener = new sc.Connection({
      kind: "whep", room, token,
      prepare: (pc) => {
        // The first audio/video m-lines are the teacher's (ourselves): not wanted. The second
        // ones are the speaker slot.
        pc.addTransceiver("audio", { direction: "inactive" });
        pc.addTransceiver("video", { direction: "inactive" });
        pc.addTransceiver("audio", { direction: "recvonly" });
        pc.addTransceiver("video", { direction: "recvonly" });
      },
      onTrack: (event) => {
        listenerStream.addTrack(event.track);
        if (media && media.srcObject !== listenerStream) {
          media.srcObject = listenerStream;
          media.play().catch(() => {});
        }
      },
    });
    listener.start();
  }

  function stopListening() {
    if (!listener) return;
    listener.stop().catch(() => {});
    listener = null;
    listenerStream = null;
  }

  function floorChanged() {
    if (!model.you) return;
    if (iHaveTheFloor()) {
      if (!speaker) startSpeaking(false);
    } else {
      stopSpeaking();
    }
    if (model.you.staff && model.you.role !== "ops") {
      if (model.floor) startListening();
      else stopListening();
    }
  }

  async function speakerStats() {
    const out = { listening: Boolean(listener), audioPacketsReceived: 0, audioLevel: 0, framesDecoded: 0 };
    const pc = listener && listener.session ? listener.session.pc : null;
    if (!pc) return out;
    const report = await pc.getStats();
    report.forEach((s) => {
      if (s.type !== "inbound-rtp") return;
      if (s.kind === "audio") {
        out.audioPacketsReceived += s.packetsReceived || 0;
        out.audioLevel = Math.max(out.audioLevel, s.audioLevel || 0);
      } else {
        out.framesDecoded += s.framesDecoded || 0;
      }
    });
    return out;
  }

  // ---- attendance (staff) ----------------------------------------------------------------------------

  async function refreshAttendance() {
    if (!model.scope || !model.you || !model.you.staff) return;
    try {
      const resp = await fetch(`/api/lessons/${encodeURIComponent(model.scope)}/attendance`,
                               { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
      if (resp.ok) {
        model.attendance = (await resp.json()).totals;
        render();
      }
    } catch (err) { /* shown again on the next refresh */ }
  }

  // ---- rendering -----------------------------------------------------------------------------------

  const ui = {};

  function form(placeholder, button, onSubmit, label) {
    const input = el("input", { type: "text", maxLength: MAX_TEXT, placeholder, autocomplete: "off" });
    input.setAttribute("aria-label", label || placeholder);
    const node = el("form", { className: "cr-form" }, [input, el("button", { type: "submit", textContent: button })]);
    node.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = input.value.trim();
      if (text && onSubmit(text)) input.value = "";
    });
    return node;
  }

  function build() {
    const staff = model.you.staff;
    root.replaceChildren();
    root.classList.toggle("cr-staff", staff);
    root.classList.toggle("cr-student", !staff);
    ui.status = el("p", { className: "cr-status", role: "status" });
    ui.error = el("p", { className: "cr-error", role: "alert" });
    ui.presence = el("span", { className: "cr-presence" });
    ui.head = el("div", { className: "cr-head" }, [el("strong", { textContent: staff ? "Class" : "Questions" }), ui.presence]);
    root.append(ui.head, ui.status, ui.error);
    const floorAllowed = model.kind !== "lesson";

    if (staff) {
      ui.attendance = el("span", { className: "cr-attendance muted" });
      ui.head.append(ui.attendance);
      ui.questions = el("ol", { className: "cr-list cr-questions" });
      ui.questionsCount = el("span", { className: "cr-badge" });
      root.append(el("section", { className: "cr-block" }, [
        el("h3", {}, [document.createTextNode("Questions "), ui.questionsCount]), ui.questions]));
      if (floorAllowed) {
        ui.hands = el("ul", { className: "cr-list cr-hands" });
        ui.handsCount = el("span", { className: "cr-badge" });
        ui.floor = el("div", { className: "cr-floor" });
        const media = el("video", { className: "cr-speaker-media hidden", autoplay: true, playsInline: true });
        // The speaker slot always has a video track; show the picture only once frames arrive.
        media.addEventListener("resize", () => media.classList.toggle("hidden", !media.videoWidth));
        root.append(el("section", { className: "cr-block" }, [
          el("h3", {}, [document.createTextNode("Hands "), ui.handsCount]), ui.hands, ui.floor, media]));
      }
    } else {
      ui.speaking = el("div", { className: "cr-speaking hidden", role: "status" });
      ui.hand = el("button", { type: "button", className: "cr-hand" });
      ui.hand.addEventListener("click", () => send({ type: model.handUp ? "lower" : "raise" }));
      ui.ask = form("Ask the teacher a question…", "Ask", (text) => send({ type: "question", text }),
                    "Your question");
      ui.answers = el("ol", { className: "cr-list cr-answers" });
      root.append(ui.speaking, el("div", { className: "cr-row" }, floorAllowed ? [ui.hand] : []), ui.ask,
                  el("section", { className: "cr-block" }, [el("h3", { textContent: "Questions and answers" }),
                                                            ui.answers]));
    }
    ui.chat = el("ul", { className: "cr-list cr-chat" });
    const chatTitle = !staff && model.kind === "lesson" ? "Messages to the teacher" : "Chat";
    root.append(el("section", { className: "cr-block" }, [el("h3", { textContent: chatTitle }), ui.chat,
      form(staff ? "Message everyone…" : "Message…", "Send", (text) => send({ type: "chat", text }), "Chat message")]));
    render();
  }

  function questionItem(q) {
    const staff = model.you.staff;
    const item = el("li", { className: q.answered ? "answered" : "" }, [
      el("span", { className: "cr-who", textContent: q.name }),
      el("span", { className: "cr-text", textContent: q.text }),
    ]);
    if (q.answered) {
      item.append(el("span", { className: "cr-answer", textContent: q.answer ? `Answer: ${q.answer}` : "Answered" }));
    } else if (staff) {
      const answer = el("input", { type: "text", placeholder: "Answer (optional)", maxLength: 2000 });
      answer.setAttribute("aria-label", `Answer to ${q.name}`);
      const done = el("button", { type: "button", textContent: "Answered" });
      done.addEventListener("click", () => send({ type: "answered", id: q.id, answer: answer.value.trim() || null }));
      item.append(el("div", { className: "cr-row" }, [answer, done]));
    } else {
      item.append(el("span", { className: "cr-answer muted", textContent: "waiting for the teacher" }));
    }
    return item;
  }

  function renderFloor() {
    if (!ui.floor) return;
    const floor = model.floor;
    const media = root.querySelector(".cr-speaker-media");
    if (!floor) {
      ui.floor.replaceChildren(el("span", { className: "muted", textContent: "Nobody has the floor." }));
      if (media) media.classList.add("hidden");
      return;
    }
    const take = el("button", { type: "button", className: "danger", textContent: "Take the floor back" });
    take.addEventListener("click", () => send({ type: "floor", action: "take" }));
    const mute = el("button", { type: "button", textContent: floor.muted ? "Unmute" : "Mute" });
    mute.addEventListener("click", () => send({ type: "mute", name: floor.holder, muted: !floor.muted }));
    ui.floor.replaceChildren(el("span", { className: "cr-speaking-now" }, [
      el("strong", { textContent: floor.holder }),
      document.createTextNode(floor.muted ? " has the floor (muted)" : " is speaking"),
    ]), el("div", { className: "cr-row" }, [mute, take]));
    if (media) media.classList.toggle("hidden", !media.videoWidth);
  }

  function renderSpeaking() {
    if (!ui.speaking) return;
    const mine = iHaveTheFloor();
    ui.speaking.classList.toggle("hidden", !mine && !speakError);
    if (!mine) {
      ui.speaking.replaceChildren(speakError ? el("span", { textContent: `Could not speak: ${speakError}` }) : "");
      document.body.classList.remove("cr-is-speaking");
      return;
    }
    document.body.classList.add("cr-is-speaking");
    const muted = model.floor.muted;
    const camera = el("button", { type: "button", textContent: speaker && speaker.camera ? "Camera off" : "Camera on" });
    camera.addEventListener("click", () => {
      const withCamera = !(speaker && speaker.camera);
      stopSpeaking();
      startSpeaking(withCamera);
    });
    const done = el("button", { type: "button", className: "danger", textContent: "Stop speaking" });
    done.addEventListener("click", () => send({ type: "floor", action: "release" }));
    const state = speakError ? `Could not speak: ${speakError}`
      : muted ? "The teacher muted your microphone."
        : speaker && speaker.session && speaker.session.url ? "Everyone hears you." : "Turning your microphone on…";
    ui.speaking.replaceChildren(el("strong", { textContent: "You are speaking" }),
                                el("span", { textContent: state }), el("div", { className: "cr-row" }, [camera, done]));
  }

  /**
   * Show ``items`` in ``list``, reusing the node of every item whose signature did not change,
   * so re-rendering (presence arrives twice a second) never wipes an answer being typed or
   * swaps a button away under a click.
   */
  function keyed(list, items, key, signature, make, empty) {
    const cache = list._nodes || (list._nodes = new Map());
    const seen = new Set();
    const nodes = items.map((item) => {
      const id = key(item);
      const sig = signature(item);
      seen.add(id);
      let entry = cache.get(id);
      if (!entry || entry.sig !== sig) {
        entry = { sig, node: make(item) };
        cache.set(id, entry);
      }
      return entry.node;
    });
    for (const id of [...cache.keys()]) if (!seen.has(id)) cache.delete(id);
    if (!nodes.length && empty) nodes.push(list._empty || (list._empty = el("li", { className: "muted", textContent: empty })));
    const current = [...list.children];
    if (current.length !== nodes.length || current.some((node, i) => node !== nodes[i])) list.replaceChildren(...nodes);
  }

  function handItem(h) {
    const give = el("button", { type: "button", textContent: "Give the floor" });
    give.addEventListener("click", () => send({ type: "floor", action: "give", name: h.name }));
    const lower = el("button", { type: "button", textContent: "Lower" });
    lower.addEventListener("click", () => send({ type: "lower", name: h.name }));
    return el("li", {}, [el("span", { className: "cr-who", textContent: h.name }), give, lower]);
  }

  function chatItem(m) {
    return el("li", {}, [
      el("span", { className: "cr-time muted", textContent: time(m.ts) }),
      el("span", { className: `cr-who ${m.role !== "student" ? "cr-staff-name" : ""}`, textContent: m.name }),
      el("span", { className: "cr-text", textContent: m.text }),
    ]);
  }

  function once(node, signature, draw) {
    if (node._sig === signature) return;
    node._sig = signature;
    draw();
  }

  function render() {
    root.dataset.state = model.status;
    if (!model.you) return;
    root.dataset.speaking = String(Boolean(speaker));
    const p = model.presence;
    if (p) {
      const students = p.students || 0;
      ui.presence.textContent = p.names && !model.you.staff
        ? ` · ${p.names.map((n) => n.name).join(", ")}`
        : ` · ${plural(students, "student")} here`;
    }
    if (ui.attendance && model.attendance) {
      ui.attendance.textContent = ` · ${plural(model.attendance.students, "student")} attended`;
    }
    ui.status.textContent = model.closedReason || (model.status === "reconnecting" ? "Reconnecting…" : "");
    ui.error.textContent = model.error;
    const questions = [...model.questions.values()].sort((a, b) => a.ts - b.ts);
    const qKey = (q) => q.id;
    const qSig = (q) => `${q.answered}|${q.answer || ""}`;
    if (ui.questions) {
      const open = questions.filter((q) => !q.answered);
      ui.questionsCount.textContent = open.length ? String(open.length) : "";
      keyed(ui.questions, [...open, ...questions.filter((q) => q.answered).slice(-20)], qKey, qSig, questionItem,
            "No questions yet.");
    }
    if (ui.answers) keyed(ui.answers, questions.slice(-50), qKey, qSig, questionItem, "");
    if (ui.hands) {
      ui.handsCount.textContent = model.hands.length ? String(model.hands.length) : "";
      keyed(ui.hands, model.hands.slice(0, 50), (h) => h.name, () => "", handItem, "No hands up.");
    }
    const floor = model.floor;
    if (ui.floor) {
      once(ui.floor, floor ? `${floor.holder}|${floor.muted}` : "none", renderFloor);
    }
    if (ui.hand) {
      ui.hand.textContent = model.handUp ? "Lower your hand" : "Raise your hand";
      ui.hand.classList.toggle("primary", !model.handUp);
      ui.hand.setAttribute("aria-pressed", String(model.handUp));
      ui.hand.classList.toggle("hidden", iHaveTheFloor());
    }
    if (ui.speaking) {
      const live = Boolean(speaker && speaker.session && speaker.session.url);
      once(ui.speaking, `${iHaveTheFloor()}|${floor && floor.muted}|${speakError}|${live}|${speaker && speaker.camera}`,
           renderSpeaking);
    }
    const atBottom = ui.chat.scrollTop + ui.chat.clientHeight >= ui.chat.scrollHeight - 8;
    keyed(ui.chat, model.chat.slice(-100), (m) => m.id, () => "", chatItem, "");
    if (atBottom) ui.chat.scrollTop = ui.chat.scrollHeight;
  }

  // ---- the watch page's drawer ----------------------------------------------------------------

  if (root.classList.contains("drawer")) {
    const toggle = el("button", { type: "button", id: "classroom-toggle", className: "classroom-toggle",
                                  textContent: "Questions" });
    toggle.setAttribute("aria-controls", "classroom");
    const setOpen = (open) => {
      root.classList.toggle("open", open);
      toggle.setAttribute("aria-expanded", String(open));
    };
    toggle.addEventListener("click", () => setOpen(!root.classList.contains("open")));
    document.body.append(toggle);
    setOpen(window.matchMedia("(min-width: 900px)").matches);
  }

  window.addEventListener("pagehide", () => {
    stopSpeaking();
    stopListening();
    stopped = true;
    if (ws) ws.close();
  });
  setInterval(() => { if (!document.hidden) refreshAttendance(); }, 15000);
  sc.classroom = {
    state: () => ({
      status: model.status, you: model.you, kind: model.kind, floor: model.floor, presence: model.presence,
      questions: [...model.questions.values()], hands: model.hands, handUp: model.handUp,
      speaking: Boolean(speaker && speaker.session && speaker.session.url), speakError, closedReason: model.closedReason,
      attendance: model.attendance, chat: model.chat.length,
    }),
    send,
    speakerStats,
  };
  connect();
})();
