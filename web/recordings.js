/*
 * recordings.js — the list of recorded lessons on the landing page.
 *
 * Fills any element with id="recordings" from GET /api/recordings: newest first, filterable
 * by date, grade and subject (the API's own filters), each lesson linking to /replay/{id}.
 * Self-contained so the landing page only needs a container and this script.
 */
(function () {
  "use strict";

  const root = document.getElementById("recordings");
  if (!root) return;

  const el = window.skyclass.el;  // skyclass.js

  function clock(seconds) {
    seconds = Math.max(0, Math.floor(seconds || 0));
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    return h ? `${h}:${String(m).padStart(2, "0")}:${String(s).padStart(2, "0")}` : `${m}:${String(s).padStart(2, "0")}`;
  }

  const inline = "width:auto;min-height:44px";
  const date = el("input", { type: "date", id: "rec-date", title: "Lesson date", style: inline });
  const grade = el("select", { id: "rec-grade", title: "Grade", style: inline });
  const subject = el("select", { id: "rec-subject", title: "Subject", style: inline });
  const list = el("ul", { className: "recordings-list" });
  const note = el("p", { className: "muted", textContent: "Loading…" });
  root.append(
    el("h2", { textContent: "Recorded lessons", style: "margin-top:0" }),
    el("div", { className: "row", style: "margin-bottom:0.75rem" }, [date, grade, subject]),
    note, list,
  );

  let known = { grades: new Set(), subjects: new Set() };

  function fillSelect(select, label, values) {
    const current = select.value;
    select.replaceChildren(el("option", { value: "", textContent: label }),
      ...[...values].sort((a, b) => a.localeCompare(b, undefined, { numeric: true }))
        .map((v) => el("option", { value: v, textContent: v })));
    select.value = values.has(current) ? current : "";
  }

  function item(rec) {
    const started = new Date(rec.started_at * 1000);
    const when = started.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
    const state = rec.state === "recording" ? " · recording now" : rec.state === "repaired" ? " · recovered" : "";
    return el("li", {}, [
      el("a", { href: rec.page, textContent: rec.title }),
      el("span", { className: "muted", textContent: ` — ${rec.teacher}, ${when}, ${clock(rec.duration)}${state}` }),
    ]);
  }

  async function load() {
    const params = new URLSearchParams();
    if (date.value) params.set("date", date.value);
    if (grade.value) params.set("grade", grade.value);
    if (subject.value) params.set("subject", subject.value);
    try {
      const resp = await fetch(`/api/recordings${params.size ? "?" + params : ""}`);
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const { recordings } = await resp.json();
      if (!params.size) {
        known = { grades: new Set(), subjects: new Set() };
        for (const r of recordings) {
          if (r.grade) known.grades.add(r.grade);
          if (r.subject) known.subjects.add(r.subject);
        }
        fillSelect(grade, "All grades", known.grades);
        fillSelect(subject, "All subjects", known.subjects);
      }
      list.replaceChildren(...recordings.map(item));
      note.textContent = recordings.length ? "" : "No recorded lessons yet.";
    } catch (err) {
      note.textContent = `Could not load the recordings (${err.message}).`;
    }
  }

  for (const control of [date, grade, subject]) control.addEventListener("change", load);
  load();
  setInterval(() => { if (!document.hidden) load(); }, 30000);
})();
