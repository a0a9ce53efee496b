"""The harness's outputs: a progress bar while it runs, a terminal summary, ``report.json`` and
a self-contained ``report.html`` whose plots are inline SVG written here (no plotting
dependency: a load machine should need nothing but the project).
"""

from __future__ import annotations

import html
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, TextIO

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]


# --- terminal ----------------------------------------------------------------------------

class TerminalProgress:
    """A one-line progress bar on a terminal (rewritten in place), or a line every
    ``every`` seconds when the output is a file or a CI log."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 24, every: float = 10.0) -> None:
        self.stream = stream
        self.width = width
        self.every = every
        self.tty = stream.isatty()
        self._last = 0.0
        self._dirty = False

    def __call__(self, row: dict, context: dict) -> None:
        duration = context.get("duration")
        if duration:  # a run of known length: a bar
            done = min(1.0, row["t"] / duration)
            filled = int(round(done * self.width))
            bar = "#" * filled + "." * (self.width - filled)
            parts = [f"[{bar}] {100 * done:3.0f}% {row['t']:5.0f}/{duration:.0f}s"]
        else:  # open-ended (the capacity search): what it is doing
            done = 0.0
            parts = [f"{context.get('label', '')} {row['t']:5.0f}s"]
        if context.get("sessions"):
            parts.append(f"joined {row['joined']}/{context['sessions']} failed {row['failed']} active {row['active']}")
            if row.get("loss_p95") is not None:
                parts.append(f"loss p95 {row['loss_p95']:.2f}%")
            if row.get("delay_p95") is not None:
                parts.append(f"delay p95 {row['delay_p95']:.0f}ms")
        if context.get("viewers"):
            parts.append(f"replay {row.get('replay_done', 0)}/{context['viewers']} done")
        if row.get("server_cpu") is not None:
            parts.append(f"server {row['server_cpu']:.2f} cores")
        line = "  ".join(parts)
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160))
            self.stream.flush()
            self._dirty = True
        elif time.monotonic() - self._last >= self.every or done >= 1.0:
            self._last = time.monotonic()
            self.stream.write(line + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        self.end_line()
        self.stream.write(text + "\n")
        self.stream.flush()

    def end_line(self) -> None:
        if self._dirty:
            self.stream.write("\n")
            self._dirty = False


def _fmt(value: Any, spec: str = "", unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return (format(value, spec) if spec else str(value)) + unit


def terminal_summary(report: dict) -> str:
    """The verdict and the figures that matter, for a human at a terminal."""
    lines = []
    sc = report["scenario"]
    plan = report["plan"]
    lines.append(f"skyclass loadtest: {sc['name']} at scale {sc['scale']:g} against {report['target']['url']}")
    lines.append(f"  {plan['teachers']} teachers, {plan['students']} students ({plan['sessions']} sessions, "
                 f"{plan['rejoins']} rejoins), {plan['replay_viewers']} replay viewers, {plan['duration_s']:.0f} s")
    s = report["summary"]
    joins = s.get("joins")
    if joins:
        ks = joins["keyframe_s"]
        lines.append(f"  joins: {joins['joined']}/{joins['attempted']} reached media ({_fmt(joins['success_pct'], '.2f')}%); "
                     f"first keyframe p50 {_fmt(ks['p50'], '.2f')} s, p95 {_fmt(ks['p95'], '.2f')} s, "
                     f"max {_fmt(ks['max'], '.2f')} s; DTLS connected p95 {_fmt(joins['dtls_s']['p95'], '.2f')} s"
                     + (f"; failures {joins['failures']}" if joins["failures"] else ""))
    media = s.get("media")
    if media:
        lines.append(f"  media: loss p95 {_fmt(media['loss_raw_pct']['p95'], '.3f')}% before repair, "
                     f"{_fmt(media['loss_residual_pct']['p95'], '.3f')}% after; freeze {_fmt(media['freeze_pct'], '.3f')}% "
                     f"of {media['watch_s']:.0f} s watched; delay p50 {_fmt(media['delay_ms']['p50'], '.0f')} ms, "
                     f"p95 {_fmt(media['delay_ms']['p95'], '.0f')} ms; NACKs {media['nacks_sent']}, "
                     f"repaired {media['packets_repaired']}, PLIs {media['plis_sent']}")
    replay = s.get("replay")
    if replay:
        lines.append(f"  replay: {replay['completed']}/{replay['viewers']} completed; startup p95 "
                     f"{_fmt(replay['startup_s']['p95'], '.2f')} s; stall {_fmt(replay['stall_pct'], '.3f')}%; "
                     f"{replay['bytes'] / 1e6:.1f} MB in {replay['segments']} segments")
    cost = s.get("cost") or {}
    if cost:
        lines.append(f"  cost in steady state ({_fmt(cost.get('students'))} students, {_fmt(cost.get('window_s'))} s): "
                     f"server {_fmt(cost.get('server_cpu_cores'), '.3f')} cores = "
                     f"{_fmt(cost.get('server_cpu_per_student_pct'), '.3f')}% of a core per student "
                     f"({_fmt(cost.get('students_per_server_core'), '.0f')} students/core); simulated students "
                     f"{_fmt(cost.get('client_cpu_per_student_pct'), '.3f')}% per student; whole harness "
                     f"{_fmt(cost.get('harness_cpu_per_student_pct'), '.3f')}% per student")
    for imp in report.get("impaired", []):
        lines.append(f"  injected loss {imp['id']}: 1 in {imp['drop_every']} ({imp['expected_loss_pct']:.2f}%, "
                     f"{imp['injected_drops']} drops) measured {_fmt(imp['measured_loss_raw_pct'], '.3f')}% before "
                     f"repair, {_fmt(imp['measured_loss_residual_pct'], '.3f')}% after")
    lines.append("  objectives:")
    for row in report["objectives"]:
        mark = {"pass": "ok  ", "fail": "FAIL", "skipped": "skip"}[row["status"]]
        lines.append(f"    {mark} {row['objective']:<24} {_fmt(row['measured'], '.3f') if isinstance(row['measured'], float) else _fmt(row['measured'])}"
                     f" {row['op']} {row['target']}{row['unit']}" + (f"  ({row['note']})" if row.get("note") else ""))
    for note in report.get("notes", []):
        lines.append(f"  note: {note}")
    lines.append(f"verdict: {report['verdict'].upper()}")
    return "\n".join(lines)


# --- SVG -------------------------------------------------------------------------------------

def _nice_max(value: float) -> float:
    if value <= 0 or not math.isfinite(value):
        return 1.0
    exponent = math.floor(math.log10(value))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * 10 ** exponent >= value:
            return m * 10 ** exponent
    return 10 ** (exponent + 1)


def _ticks(lo: float, hi: float, count: int = 8) -> list[float]:
    """Round-numbered ticks between ``lo`` and ``hi`` (about ``count`` of them)."""
    raw = (hi - lo) / max(1, count - 1)
    if raw <= 0:
        return [lo]
    exponent = 10 ** math.floor(math.log10(raw))
    step = next(m * exponent for m in (1, 2, 2.5, 5, 10) if m * exponent >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    value = first
    while value <= hi + 1e-9 and len(ticks) < 20:
        ticks.append(round(value, 10))
        value += step
    return ticks


def line_chart(title: str, series: list[tuple[str, list[tuple[float, Optional[float]]]]], x_label: str = "s",
               y_label: str = "", width: int = 620, height: int = 230, step: bool = False,
               hline: Optional[tuple[float, str]] = None) -> str:
    """An SVG line chart. ``series`` = [(label, [(x, y or None), ...])]; None breaks a line.
    ``hline`` draws a dashed threshold (an objective) with its label."""
    left, right, top, bottom = 58, 12, 26, 38
    pw, ph = width - left - right, height - top - bottom
    points = [(x, y) for _, data in series for x, y in data if y is not None]
    if not points:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="60"><text x="8" y="30" '
                f'font-size="13">{html.escape(title)}: no data</text></svg>')
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    if x1 <= x0:
        x1 = x0 + 1
    ymax_data = max(p[1] for p in points)
    if hline:
        ymax_data = max(ymax_data, hline[0])
    ymax = _nice_max(ymax_data * 1.05)

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - min(y, ymax) / ymax * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11">',
           f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for i in range(5):
        value = ymax * i / 4
        y = sy(value)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>')
        label = f"{value:.3g}"
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for x in _ticks(x0, x1):
        out.append(f'<text x="{sx(x):.1f}" y="{top + ph + 14}" text-anchor="middle">{x:.6g}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{html.escape(x_label)}</text>')
    if y_label:
        out.append(f'<text x="12" y="{top + ph / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 12 {top + ph / 2})">{html.escape(y_label)}</text>')
    if hline:
        y = sy(hline[0])
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#d62728" '
                   f'stroke-dasharray="5,4"/>')
        out.append(f'<text x="{left + pw - 4}" y="{y - 4:.1f}" text-anchor="end" fill="#d62728">'
                   f'{html.escape(hline[1])}</text>')
    legend_x = left + 8
    for i, (label, data) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        segments: list[list[str]] = [[]]
        previous_y: Optional[float] = None
        for x, y in data:
            if y is None:
                if segments[-1]:
                    segments.append([])
                previous_y = None
                continue
            if step and previous_y is not None:
                segments[-1].append(f"{sx(x):.1f},{sy(previous_y):.1f}")
            segments[-1].append(f"{sx(x):.1f},{sy(y):.1f}")
            previous_y = y
        for seg in segments:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{color}"/>')
            elif seg:
                out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{" ".join(seg)}"/>')
        out.append(f'<rect x="{legend_x}" y="{top + 6}" width="10" height="3" fill="{color}"/>')
        out.append(f'<text x="{legend_x + 14}" y="{top + 11}">{html.escape(label)}</text>')
        legend_x += 22 + 6.5 * len(label)
    out.append("</svg>")
    return "".join(out)


def _series(timeline: list[dict], key: str) -> list[tuple[float, Optional[float]]]:
    return [(row["t"], row.get(key)) for row in timeline]


def _objective(report: dict, name: str) -> Optional[tuple[float, str]]:
    for row in report["objectives"]:
        if row["objective"] == name:
            return float(row["target"]), f"objective {row['target']}{row['unit']}"
    return None


def run_charts(report: dict) -> list[str]:
    timeline = report["timeline"]
    charts = []
    curve = report.get("joins_curve") or []
    if curve:
        charts.append(line_chart("Joins over time (reached first keyframe)",
                                 [("joined", [(t, ok) for t, ok, _ in curve]),
                                  ("failed", [(t, bad) for t, _, bad in curve])], y_label="students", step=True))
    if any(r["active"] for r in timeline):
        charts.append(line_chart("Active students", [("watching", _series(timeline, "active")),
                                                      ("joining", _series(timeline, "joining")),
                                                      ("server viewers", _series(timeline, "server_viewers"))],
                                 y_label="students"))
        charts.append(line_chart("Packet loss before repair, per 1 s window, over students",
                                 [("p50", _series(timeline, "loss_p50")), ("p95", _series(timeline, "loss_p95")),
                                  ("max", _series(timeline, "loss_max")),
                                  ("p95 after repair", _series(timeline, "residual_p95"))], y_label="%",
                                 hline=_objective(report, "loss_p95_pct")))
        charts.append(line_chart("End-to-end delay of video frames, per window",
                                 [("p50", _series(timeline, "delay_p50")), ("p95", _series(timeline, "delay_p95")),
                                  ("p99", _series(timeline, "delay_p99"))], y_label="ms",
                                 hline=_objective(report, "delay_p95_ms")))
    cpu_series = [("server", _series(timeline, "server_cpu")), ("simulated students", _series(timeline, "client_cpu")),
                  ("teachers", _series(timeline, "teacher_cpu")), ("machine busy", _series(timeline, "machine_busy_cores"))]
    charts.append(line_chart("CPU", cpu_series, y_label="cores"))
    if any(r.get("server_pps_out") for r in timeline):
        charts.append(line_chart("Server packets per second", [("out", _series(timeline, "server_pps_out")),
                                                               ("in", _series(timeline, "server_pps_in")),
                                                               ("retransmitted", _series(timeline, "server_retransmissions"))],
                                 y_label="packets/s"))
    if any(r.get("replay_playing") is not None for r in timeline):
        charts.append(line_chart("Replay viewers", [("playing", _series(timeline, "replay_playing")),
                                                    ("done", _series(timeline, "replay_done")),
                                                    ("failed", _series(timeline, "replay_failed"))], y_label="viewers"))
        charts.append(line_chart("Replay throughput", [("served", _series(timeline, "replay_mbps"))], y_label="Mbit/s"))
    return charts


# --- HTML ---------------------------------------------------------------------------------------

STYLE = """
body{font-family:sans-serif;margin:24px;max-width:1320px;color:#222}
h1{font-size:22px} h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left} th{background:#f4f4f4}
.pass{color:#1a7f37;font-weight:bold} .fail{color:#c62828;font-weight:bold} .skipped{color:#777}
.verdict{font-size:26px;padding:8px 14px;display:inline-block;border-radius:6px}
.verdict.pass{background:#e6f4ea} .verdict.fail{background:#fdecea} .verdict.skipped{background:#eee}
.charts{display:flex;flex-wrap:wrap;gap:12px} .note{background:#fff8e1;padding:6px 10px;margin:4px 0}
code{background:#f4f4f4;padding:1px 4px}
"""


def _table(rows: Iterable[dict], columns: list[tuple[str, str]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(label)}</th>" for _, label in columns) + "</tr>"]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            if isinstance(value, float):
                value = f"{value:.4g}"
            cls = f' class="{value}"' if key == "status" else ""
            cells.append(f"<td{cls}>{html.escape(_fmt(value))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _kv(data: dict, prefix: str = "") -> list[dict]:
    rows = []
    for key, value in data.items():
        if isinstance(value, dict) and value and all(not isinstance(v, dict) for v in value.values()) and \
                set(value) <= {"p50", "p95", "p99", "max", "n", "frames"}:
            rows.append({"k": prefix + key, "v": ", ".join(f"{k} {_fmt(v, '.4g') if isinstance(v, float) else _fmt(v)}"
                                                           for k, v in value.items())})
        elif isinstance(value, dict):
            if not value:
                rows.append({"k": prefix + key, "v": "-"})
            else:
                rows.extend(_kv(value, prefix + key + "."))
        else:
            rows.append({"k": prefix + key, "v": value})
    return rows


def render_html(report: dict, charts: Optional[list[str]] = None, title: Optional[str] = None) -> str:
    """``report.html``: verdict, objectives, summary tables and plots, in one file."""
    sc = report["scenario"]
    title = title or f"skyclass loadtest: {sc['name']}"
    verdict = report["verdict"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>{html.escape(sc.get('description') or '')}</p>",
             f"<p>Scale {sc['scale']:g} (full size {sc.get('full_size_students', '-')} students) against "
             f"<code>{html.escape(report['target']['url'])}</code>; started {html.escape(report['started_at'])}, "
             f"{report['wall_s']} s; commit {html.escape(str(report['code'].get('commit')))}; "
             f"{report['machine']['cores']} cores here.</p>",
             f"<div class='verdict {verdict}'>Verdict: {verdict.upper()}</div>"]
    for note in report.get("notes", []):
        parts.append(f"<div class='note'>{html.escape(note)}</div>")
    parts.append("<h2>Objectives</h2>")
    parts.append(_table(report["objectives"], [("objective", "objective"), ("describe", "what"), ("op", ""),
                                               ("target", "target"), ("measured", "measured"), ("unit", "unit"),
                                               ("status", "status"), ("note", "note")]))
    parts.append("<h2>Plots</h2><div class='charts'>" + "".join(charts if charts is not None else run_charts(report))
                 + "</div>")
    extra = report.get("capacity")
    if extra:
        parts.append("<h2>Capacity</h2>")
        parts.append(_table(_kv({k: v for k, v in extra.items() if k not in ("steps",)}), [("k", ""), ("v", "")]))
        parts.append(_table(extra.get("steps", []), [(k, k) for k in CAPACITY_COLUMNS]))
    parts.append("<h2>Summary</h2>")
    parts.append(_table(_kv(report["summary"]), [("k", "figure"), ("v", "value")]))
    if report.get("impaired"):
        parts.append("<h2>Injected loss (ground truth of the loss measurement)</h2>")
        parts.append(_table(report["impaired"], [(k, k) for k in report["impaired"][0]]))
    if report.get("rooms"):
        parts.append("<h2>Rooms</h2>")
        parts.append(_table(report["rooms"], [(k, k) for k in report["rooms"][0]]))
    parts.append("<h2>Plan</h2>")
    parts.append(_table(_kv({k: v for k, v in report["plan"].items() if k != "rooms"}), [("k", ""), ("v", "")]))
    parts.append("<p>Every figure, the timeline and each session's record are in <code>report.json</code>. "
                 "Definitions: a join succeeds at its first video keyframe; loss is per student over its watch, "
                 "before and after NACK repair; freeze = gaps over 500 ms between video frames; delay = teacher "
                 "send to student arrival per video frame, from the RTCP sender reports' clock; students on an "
                 "injected lossy network are reported, not judged.</p>")
    parts.append("</body></html>")
    return "".join(parts)


CAPACITY_COLUMNS = ["students", "held", "reason", "join_success_pct", "keyframe_p95_s", "loss_p95_pct",
                    "residual_p95_pct", "freeze_pct", "delay_p95_ms", "server_cpu_cores", "client_cpu_cores",
                    "machine_busy_cores", "machine_busy_max", "client_lag_ms_max"]


def write_report(report: dict, directory: Path, charts: Optional[list[str]] = None) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "report.json"
    html_path = directory / "report.html"
    json_path.write_text(json.dumps(report, indent=1, default=_json_default))
    html_path.write_text(render_html(report, charts))
    return json_path, html_path


def _json_default(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
