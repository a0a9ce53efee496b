/*
 * timetable.js — today's timetable on the landing page, with the join links the visitor's
 * token allows.
 *
 * Fills the element with id="timetable" from GET /api/timetable?date=… (authenticated: the
 * token comes from ?token= on this page, or the one remembered in this browser). Students see
 * their audience's lessons with a Watch link; teachers see every lesson and a Teach link for
 * their own rooms; ops also get the teacher's and an assistant's link, and can mint a student
 * link for a name (POST /api/lessons/{id}/tokens). A lesson that has been recorded also gets a
 * Replay link, carrying the token so that the replay's watch time counts in attendance.
 */
(function () {
  "use strict";

  const root = document.getElementById("timetable");
  if (!root) return;
  const STORE = "skyclass.token";

  const el = window.skyclass.el;  // skyclass.js

  function today() {
    const d = new Date();
    return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, "0")}-${String(d.getDate()).padStart(2, "0")}`;
  }

  function hhmm(ts) {
    return new Date(ts * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  let token = new URLSearchParams(location.search).get("token") || "";
  try { token = token || localStorage.getItem(STORE) || ""; } catch (err) { /* storage disabled */ }

  const date = el("input", { type: "date", id: "tt-date", value: today(), title: "Day", style: "width:auto;min-height:44px" });
  const who = el("span", { className: "muted", id: "tt-who" });
  const note = el("p", { className: "muted", id: "tt-note" });
  const body = el("tbody");
  const table = el("table", { className: "timetable-table" }, [
    el("thead", {}, [el("tr", {}, ["Time", "Lesson", "Kind", "For", "Teacher", "Status", "Join"]
      .map((h) => el("th", { scope: "col", textContent: h })))]),
    body,
  ]);
  const tokenInput = el("input", { type: "text", id: "tt-token", placeholder: "Paste your token or lesson link",
                                   autocomplete: "off", spellcheck: false });
  const tokenForm = el("form", { className: "row", id: "tt-token-form" }, [
    tokenInput, el("button", { type: "submit", className: "primary", textContent: "Show my timetable" })]);
  const forget = el("button", { type: "button", textContent: "Use another token" });
  root.append(
    el("div", { className: "row", style: "justify-content:space-between" }, [
      el("h2", { textContent: "Timetable", style: "margin:0" }), el("div", { className: "row" }, [date, who])]),
    tokenForm, note, el("div", { className: "timetable-scroll" }, [table]), forget,
  );

  tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    let value = tokenInput.value.trim();
    if (/token=/.test(value)) {
      try { value = new URL(value, location.href).searchParams.get("token") || ""; } catch (err) { /* as typed */ }
    }
    if (!value) return;
    token = value;
    try { localStorage.setItem(STORE, token); } catch (err) { /* storage disabled */ }
    load();
  });
  forget.addEventListener("click", () => {
    token = "";
    try { localStorage.removeItem(STORE); } catch (err) { /* storage disabled */ }
    load();
  });
  date.addEventListener("change", load);

  function audience(lesson) {
    const parts = [lesson.grade ? `grade ${lesson.grade}` : null, lesson.school || null, lesson.class || null];
    return `${lesson.audience}: ${parts.filter(Boolean).join(", ")}`;
  }

  async function mintStudentLink(lesson, cell) {
    const name = (prompt(`Student's name for ${lesson.title || lesson.room}:`) || "").trim();
    if (!name) return;
    const resp = await fetch(`/api/lessons/${encodeURIComponent(lesson.id)}/tokens`, {
      method: "POST", headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
      body: JSON.stringify({ role: "student", name }),
    });
    const answer = await resp.json().catch(() => ({}));
    if (!resp.ok) {
      alert(`Could not make the link: ${answer.detail || resp.status}`);
      return;
    }
    cell.append(el("a", { href: answer.url, textContent: `Watch as ${name}`, className: "tt-link" }));
  }

  function row(lesson, role) {
    const links = el("div", { className: "tt-links" });
    const labels = { teach: "Teach", watch: "Watch", assist: "Assist", replay: "Replay" };
    for (const [kind, href] of Object.entries(lesson.links || {})) {
      links.append(el("a", { href, textContent: labels[kind] || kind, className: "tt-link" }));
    }
    if (role === "ops" && lesson.status !== "ended") {
      const mint = el("button", { type: "button", textContent: "Student link…" });
      mint.addEventListener("click", () => mintStudentLink(lesson, links));
      links.append(mint);
    }
    const status = el("span", { className: "pill", textContent: lesson.status });
    status.dataset.state = lesson.status === "live" ? "live" : lesson.status === "open" ? "waiting" : "idle";
    return el("tr", { className: `tt-${lesson.status}` }, [
      el("td", { className: "tt-time", textContent: `${hhmm(lesson.start)}–${hhmm(lesson.end)}` }),
      el("td", {}, [el("strong", { textContent: lesson.title || `Grade ${lesson.grade} ${lesson.subject}` }),
                    el("div", { className: "muted", textContent: lesson.room })]),
      el("td", { textContent: lesson.kind }),
      el("td", { textContent: audience(lesson) }),
      el("td", { textContent: lesson.teacher }),
      el("td", {}, [status]),
      el("td", {}, [links]),
    ]);
  }

  async function load() {
    const signedIn = Boolean(token);
    tokenForm.classList.toggle("hidden", signedIn);
    forget.classList.toggle("hidden", !signedIn);
    table.classList.toggle("hidden", !signedIn);
    date.classList.toggle("hidden", !signedIn);
    if (!signedIn) {
      who.textContent = "";
      note.textContent = "Paste the token (or the lesson link) your school gave you to see your lessons.";
      return;
    }
    try {
      const resp = await fetch(`/api/timetable?date=${encodeURIComponent(date.value || "today")}`,
                               { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
      const answer = await resp.json().catch(() => ({}));
      if (resp.status === 401) {
        token = "";
        try { localStorage.removeItem(STORE); } catch (err) { /* storage disabled */ }
        await load();
        note.textContent = `That token does not work (${answer.detail || "unauthorized"}). Paste another one.`;
        return;
      }
      if (!resp.ok) throw new Error(answer.detail || `HTTP ${resp.status}`);
      try { localStorage.setItem(STORE, token); } catch (err) { /* storage disabled */ }
      who.textContent = `${answer.you.name} (${answer.you.role})`;
      body.replaceChildren(...answer.lessons.map((l) => row(l, answer.you.role)));
      note.textContent = answer.lessons.length ? "" : "No lessons on this day.";
    } catch (err) {
      note.textContent = `Could not load the timetable (${err.message}).`;
    }
  }

  load();
  setInterval(() => { if (!document.hidden && token) load(); }, 60000);
})();
