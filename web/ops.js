/*
 * ops.js — the /ops dashboard: one node's health at a glance, refreshed every 2 s.
 *
 * Polls GET /api/ops (an ops token: ?token=, or the one this browser remembers) and turns
 * its cumulative counters into rates between two polls: CPU in cores, packets and megabits
 * out per second, NACKs, retransmissions, keyframe requests and slow-viewer drops per second.
 * The last five minutes of a few of them are drawn as sparklines. Tables list the fan-out
 * workers against their admission cap and the rooms with their teacher, students, speakers
 * and recording; with Redis, which node every room lives on.
 *
 * window.skyclassOps.state() returns the last snapshot and the rates (tests, debugging).
 */
(function () {
  "use strict";

  const POLL_MS = 2000;
  const HISTORY = 150; // polls kept for the sparklines: 5 minutes
  const STORE = "skyclass.token";
  const $ = (id) => document.getElementById(id);
  const statusPill = $("status");
  const report = { snapshot: null, rates: null, error: null, polls: 0 };
  const history = { cpu: [], pps: [], viewers: [] };
  let token = new URLSearchParams(location.search).get("token") || "";
  try { token = token || localStorage.getItem(STORE) || ""; } catch (err) { /* storage disabled */ }
  let previous = null;
  let timer = null;

  const el = window.skyclass.el;  // skyclass.js

  function setStatus(state, text) {
    statusPill.dataset.state = state;
    statusPill.textContent = text;
  }

  const fmt = {
    int: (n) => (n === null || n === undefined ? "–" : Math.round(n).toLocaleString()),
    one: (n) => (n === null || n === undefined ? "–" : n.toFixed(1)),
    two: (n) => (n === null || n === undefined ? "–" : n.toFixed(2)),
    bytes: (n) => (n === null || n === undefined ? "–" : `${(n / 1048576).toFixed(0)} MiB`),
    since(ts) {
      if (!ts) return "–";
      const s = Math.max(0, Math.floor(Date.now() / 1000 - ts));
      const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
      return h ? `${h} h ${m} min` : m ? `${m} min` : `${s} s`;
    },
  };

  /** Per-second rates between two snapshots; null on the first poll or after a restart. */
  function rates(prev, cur) {
    if (!prev || cur.uptime < prev.uptime) return null;
    const dt = cur.time - prev.time;
    if (dt <= 0) return null;
    const per = (a, b) => Math.max(0, (b - a) / dt);
    const c0 = prev.counters, c1 = cur.counters;
    return {
      cpu_cores: per(prev.cpu_seconds, cur.cpu_seconds),
      packets_in: per(c0.packets_in, c1.packets_in),
      packets_out: per(c0.packets_out, c1.packets_out),
      mbps_out: (per(c0.bytes_out, c1.bytes_out) * 8) / 1e6,
      nacks: per(c0.nacks_received, c1.nacks_received),
      retransmissions: per(c0.retransmissions, c1.retransmissions),
      keyframe_requests_received: per(c0.keyframe_requests_received, c1.keyframe_requests_received),
      keyframe_requests_sent: per(c0.keyframe_requests_sent, c1.keyframe_requests_sent),
      dropped: per(c0.dropped_slow_viewer, c1.dropped_slow_viewer),
    };
  }

  function sparkline(values) {
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", `0 0 ${HISTORY} 100`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("aria-hidden", "true");
    if (values.length > 1) {
      const top = Math.max(...values) || 1;
      const offset = HISTORY - values.length;
      const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      line.setAttribute("points", values.map((v, i) => `${offset + i},${98 - (v / top) * 94}`).join(" "));
      svg.append(line);
    }
    return svg;
  }

  function tile(label, value, sub, { spark = null, alert = false, key = label } = {}) {
    const node = el("div", { className: "card tile" }, [
      el("div", { className: "label", textContent: label }),
      el("div", { className: "value", textContent: value }),
      el("div", { className: "sub", textContent: sub || "\u00a0" }),
    ]);
    node.dataset.key = key;
    node.dataset.alert = String(Boolean(alert));
    if (spark) node.append(sparkline(spark));
    return node;
  }

  function renderTiles(s, r) {
    const t = s.totals;
    const free = s.capacity.slots - s.capacity.viewers;
    $("tiles").replaceChildren(
      tile("Live lessons", fmt.int(t.live), `${fmt.int(t.rooms)} rooms open · ${fmt.int(t.recording)} recording`,
           { key: "live" }),
      tile("Students watching", fmt.int(t.viewers), `${fmt.int(Math.max(0, free))} places left`,
           { key: "viewers", spark: history.viewers, alert: !s.ready }),
      tile("Connected pages", fmt.int(t.websockets), `${fmt.int(t.speakers)} speaking`, { key: "websockets" }),
      tile("CPU", r ? `${fmt.two(r.cpu_cores)}` : "–", `cores of ${s.cores} · front ${fmt.bytes(s.front.rss_bytes)}`,
           { key: "cpu", spark: history.cpu, alert: r && r.cpu_cores > 0.9 * s.cores }),
      tile("Packets out / s", r ? fmt.int(r.packets_out) : "–", r ? `${fmt.one(r.mbps_out)} Mbit/s · in ${fmt.int(r.packets_in)}/s` : "",
           { key: "packets_out", spark: history.pps }),
      tile("NACKs / s", r ? fmt.one(r.nacks) : "–", r ? `${fmt.one(r.retransmissions)} retransmitted/s` : "",
           { key: "nacks" }),
      tile("Keyframe requests / s", r ? fmt.one(r.keyframe_requests_received) : "–",
           r ? `${fmt.one(r.keyframe_requests_sent)}/s sent to teachers` : "", { key: "keyframes" }),
      tile("Dropped (slow students) / s", r ? fmt.one(r.dropped) : "–", "packets a full socket refused",
           { key: "dropped", alert: r && r.dropped > 0 }),
    );
  }

  function bar(used, cap) {
    const share = cap ? Math.min(1, used / cap) : 0;
    const node = el("span", { className: "bar" }, [el("span")]);
    node.firstChild.style.width = `${(share * 100).toFixed(0)}%`;
    node.dataset.level = share >= 1 ? "full" : share >= 0.8 ? "high" : "ok";
    return node;
  }

  function renderWorkers(s) {
    const prevWorkers = new Map(((previous && previous.workers) || []).map((w) => [w.worker, w]));
    const dt = previous ? s.time - previous.time : 0;
    const rows = s.workers.map((w) => {
      const before = prevWorkers.get(w.worker);
      const cpu = before && dt > 0 && w.cpu_seconds >= before.cpu_seconds ? (w.cpu_seconds - before.cpu_seconds) / dt : null;
      const state = el("span", { className: "pill", textContent: w.up ? "up" : "down" });
      state.dataset.state = w.up ? "idle" : "error";
      return el("tr", {}, [
        el("td", { textContent: String(w.worker) }),
        el("td", {}, [state]),
        el("td", {}, [bar(w.viewers, w.capacity), `${w.viewers} / ${w.capacity}`]),
        el("td", { textContent: cpu === null ? "–" : `${fmt.two(cpu)} cores` }),
        el("td", { textContent: String(w.restarts) }),
        el("td", { textContent: String(w.pid || "–") }),
      ]);
    });
    if (!rows.length) {
      rows.push(el("tr", {}, [el("td", { colSpan: 6, className: "muted",
        textContent: `no fan-out workers: students are served by the front process (cap ${s.capacity.per_worker})` })]));
    }
    $("workers").replaceChildren(...rows);
  }

  function renderRooms(s) {
    const rows = s.rooms.map((room) => {
      const label = room.live ? (room.upstream ? `live from ${room.upstream}` : "live") : room.publisher ? "starting" : "waiting";
      const state = el("span", { className: "pill", textContent: label });
      state.dataset.state = room.live ? "live" : "waiting";
      const rec = room.recording;
      const watch = el("a", { href: `/watch/${encodeURIComponent(room.room)}`, textContent: room.room });
      const replay = rec
        ? el("a", { href: `/replay/${encodeURIComponent(rec.id)}`, textContent: `${rec.state} · ${fmt.int(rec.duration)} s` })
        : el("span", { className: "muted", textContent: "–" });
      const tr = el("tr", {}, [
        el("td", {}, [watch]),
        el("td", {}, [state]),
        el("td", { textContent: room.publisher || "–" }),
        el("td", { textContent: fmt.int(room.viewers) }),
        el("td", { textContent: room.speakers.join(", ") || "–" }),
        el("td", { textContent: fmt.int(room.websockets) }),
        el("td", { textContent: Object.values(room.codecs).join(" + ") || "–" }),
        el("td", { textContent: fmt.since(room.started_at) }),
        el("td", {}, [replay]),
      ]);
      tr.dataset.room = room.room;
      return tr;
    });
    $("rooms").replaceChildren(...rows);
    $("no-rooms").classList.toggle("hidden", rows.length > 0);
  }

  function renderCluster(s) {
    const entries = Object.entries(s.cluster.rooms).sort(([a], [b]) => a.localeCompare(b));
    $("cluster-card").classList.toggle("hidden", entries.length === 0 || s.store !== "redis");
    $("cluster").replaceChildren(...entries.map(([room, node]) => el("tr", {}, [
      el("td", { textContent: room }),
      el("td", { textContent: node === s.node ? `${node} (this node)` : node }),
    ])));
  }

  function render(s, r) {
    $("node").textContent = s.node;
    document.title = `Ops · ${s.node} · skyclass`;
    $("meta").replaceChildren(...[
      `up ${fmt.since(s.time - s.uptime)}`,
      `state: ${s.store}`,
      `${s.capacity.workers || "no"} fan-out workers × ${s.capacity.per_worker} students`,
      s.cluster.nodes.length ? `${s.cluster.nodes.length} node(s) with rooms` : null,
      `updated ${new Date(s.time * 1000).toLocaleTimeString()}`,
    ].filter(Boolean).map((text) => el("span", { textContent: text })));
    if (s.ready) setStatus("idle", "Ready"); else setStatus("error", "Full: new students get 503");
    renderTiles(s, r);
    renderWorkers(s);
    renderRooms(s);
    renderCluster(s);
  }

  function askForToken(text) {
    $("token-form").classList.remove("hidden");
    $("message").textContent = text;
    setStatus("error", "Signed out");
  }

  async function poll() {
    timer = null;
    try {
      const resp = await fetch("/api/ops", { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
      if (resp.status === 401 || resp.status === 403) {
        const body = await resp.json().catch(() => ({}));
        askForToken(`That token cannot open the ops view (${body.detail || resp.status}).`);
        return;
      }
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const s = await resp.json();
      const r = rates(previous, s);
      if (r) {
        for (const [key, value] of [["cpu", r.cpu_cores], ["pps", r.packets_out], ["viewers", s.totals.viewers]]) {
          history[key].push(value);
          if (history[key].length > HISTORY) history[key].shift();
        }
      }
      render(s, r);
      previous = s;
      report.snapshot = s;
      report.rates = r;
      report.error = null;
      report.polls += 1;
    } catch (err) {
      report.error = String(err && err.message || err);
      setStatus("error", "Node unreachable");
    }
    timer = setTimeout(poll, POLL_MS);
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    let value = $("token").value.trim();
    if (/token=/.test(value)) {
      try { value = new URL(value, location.href).searchParams.get("token") || ""; } catch (err) { /* as typed */ }
    }
    if (!value) return;
    token = value;
    try { localStorage.setItem(STORE, token); } catch (err) { /* storage disabled */ }
    $("token-form").classList.add("hidden");
    previous = null;
    if (timer) clearTimeout(timer);
    poll();
  });

  window.skyclassOps = {
    state() { return { snapshot: report.snapshot, rates: report.rates, error: report.error, polls: report.polls }; },
  };

  if (token) poll(); else askForToken("Paste an ops token to watch this node.");
})();
