"""The load-test harness: scenarios, verdict arithmetic, and two real runs against a real server.

The runs check what the harness is for: ``skyclass loadtest rehearsal`` carries out a mock
lesson end to end and writes a passing report, and its loss measurement matches ground
truth (one student's network drops every k-th RTP packet before SRTP; the harness must
report that loss within ±0.5 %, and the NACK repair it drives must show).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from skyclass.loadtest import analysis, report as report_mod
from skyclass.loadtest.harness_worker import lossy_filter
from skyclass.loadtest.light_clients import delay_bin, histogram_percentile
from skyclass.loadtest.runner import Options, run_scenario
from skyclass.loadtest.scenario import (Objectives, ScenarioError, available_scenarios, join_offsets,
                                        load_scenario, parse_scenario)
from skyclass.server.cli import main as skyclass_main

from conftest import SECRET, ServerProcess, require_binary  # the secret the test server signs with


# --- scenarios and arithmetic (no server) ------------------------------------------------

def test_shipped_scenarios_load_and_scale() -> None:
    assert {"rehearsal", "district-morning", "afternoon-qa", "replay-evening"} <= set(available_scenarios())
    morning = load_scenario("district-morning")
    assert morning.full_size_students() == 9 * 8000
    (group,) = morning.rooms
    assert morning.scaled_rooms(group, 0.002) == (9, 16)  # the grades stay, classes shrink
    qa = load_scenario("afternoon-qa")
    assert [qa.scaled_rooms(g, 0.01)[0] for g in qa.rooms] == [1, 4]  # Q&A keeps room sizes, fewer rooms
    assert load_scenario("replay-evening").replay[0].viewers > 0


def test_scenario_typos_are_errors() -> None:
    with pytest.raises(ScenarioError, match="unknown key"):
        parse_scenario({"rooms": [{"name": "r", "studnets": 3}]}, "typo")
    with pytest.raises(ScenarioError, match="unknown key"):
        parse_scenario({"rooms": [{"name": "r"}], "objectives": {"loss_p59_pct": 1}}, "typo")
    with pytest.raises(ScenarioError, match="ramp must end"):
        parse_scenario({"rooms": [{"name": "r", "ramp": 50, "lesson": 30}]}, "short")


def test_storm_ramp_front_loads_joins() -> None:
    group = load_scenario("district-morning").rooms[0]
    offsets = join_offsets(group, 300, random.Random(1))
    assert len(offsets) == 300 and 0 <= min(offsets) and max(offsets) <= group.ramp
    first_third = sum(1 for t in offsets if t < group.ramp / 3)
    assert 0.55 < first_third / 300 < 0.72


def test_lossy_filter_drops_every_kth_rtp_and_lets_retransmissions_through() -> None:
    accept, counts = lossy_filter(10)
    rtp = [bytes([0x80, 96, seq >> 8, seq & 0xFF]) + bytes(4) + b"\x00\x00\x00\x01" + b"x" * 20 for seq in range(100)]
    passed = [p for p in rtp if accept(p)]
    assert counts == {"rtp": 100, "dropped": 10} and len(passed) == 90
    dropped = [p for p in rtp if p not in passed]
    assert all(accept(p) for p in dropped)  # their retransmissions pass
    assert accept(bytes([0x80, 200]) + bytes(30))  # RTCP is never dropped
    assert accept(b"\x00\x01" + bytes(30))  # nor STUN


def test_verdict_rules() -> None:
    objectives = Objectives(delay_p95_ms=100.0, residual_loss_p95_pct=None)
    values = {"join_success_pct": 100.0, "first_keyframe_p95_s": 1.0, "loss_p95_pct": 0.2, "freeze_pct": 0.0,
              "delay_p95_ms": 50.0, "teacher_success_pct": 100.0}
    verdict, rows = analysis.evaluate(objectives, values, live=True, replay="not in scenario")
    assert verdict == "pass" and {r["objective"] for r in rows} >= {"delay_p95_ms", "loss_p95_pct"}
    assert "residual_loss_p95_pct" not in {r["objective"] for r in rows}  # unset: not judged
    verdict, rows = analysis.evaluate(objectives, dict(values, delay_p95_ms=None), live=True, replay="not in scenario")
    assert verdict == "fail"  # an objective that could not be measured does not hold
    verdict, rows = analysis.evaluate(objectives, dict(values, loss_p95_pct=1.0), live=True, replay="not in scenario")
    assert verdict == "fail" and [r["objective"] for r in rows if not r["ok"]] == ["loss_p95_pct"]
    verdict, rows = analysis.evaluate(objectives, {}, live=False, replay="the server has no recordings")
    assert verdict == "skipped" and all(r["status"] == "skipped" for r in rows)


def test_delay_histogram_percentiles() -> None:
    hist: dict[int, int] = {}
    for ms in [5.5] * 90 + [250.0] * 10:
        hist[delay_bin(ms)] = hist.get(delay_bin(ms), 0) + 1
    assert histogram_percentile(hist, 50) == 6.0
    assert 250 <= histogram_percentile(hist, 95) <= 255


def test_svg_chart() -> None:
    svg = report_mod.line_chart("t", [("a", [(0, 1.0), (1, None), (2, 3.0), (3, 4.0)])], hline=(2.0, "objective"))
    assert svg.startswith("<svg") and "polyline" in svg and "objective" in svg


# --- real runs ----------------------------------------------------------------------------------

def test_rehearsal_against_a_real_server(server: ServerProcess, tmp_path: Path) -> None:
    """``skyclass loadtest rehearsal`` at small scale: exit 0, a passing report with plots,
    figures from both sides (students and the server's own CPU, read from /proc)."""
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exit_info:
        skyclass_main(["--log-level", "WARNING", "loadtest", "rehearsal", "--url", server.url, "--secret", SECRET,
                       "--report", str(out), "--scale", "0.5", "--workers", "2", "--quiet"])
    assert exit_info.value.code == 0, (out / "report.json").read_text()[:3000] if (out / "report.json").exists() else ""
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "pass", report["objectives"]
    assert report["plan"]["students"] == 6 and report["plan"]["rejoins"] >= 1
    joins = report["summary"]["joins"]
    assert joins["joined"] == joins["attempted"] == report["plan"]["sessions"]
    assert 0 < joins["keyframe_s"]["p95"] < 3 and joins["dtls_s"]["p50"] is not None
    media = report["summary"]["media"]
    assert media["delay_ms"]["frames"] > 100 and media["fps"]["p50"] > 20
    assert {s["state"] for s in report["sessions"]} <= {"ended", "left"}
    assert report["target"]["server_pid"] == server.proc.pid  # found by its port
    assert report["summary"]["cost"]["server_cpu_cores"] > 0
    assert any(r.get("server_pps_out") for r in report["timeline"])
    page = (out / "report.html").read_text()
    assert "Verdict: PASS" in page and page.count("<svg") >= 4


INJECTED = """
name = "injected-loss"
[[rooms]]
name = "lossy"
students = 3
teacher_lead = 1.5
ramp = 1.0
lesson = 14.0
[[impairments]]
room = "lossy"
students = 1
drop_every = 25
[objectives]
join_success_pct = 100.0
loss_p95_pct = 0.5
residual_loss_p95_pct = 0.5
[teacher]
clip_seconds = 4
"""


def test_injected_loss_is_reported_at_that_loss(server: ServerProcess, tmp_path: Path) -> None:
    """Ground truth: a student whose network drops 1 RTP packet in 25 (4 %) before SRTP is
    reported at 4 % ± 0.5 % before repair; the NACKs it sends get the packets back; the
    other students see no loss, and the impaired one does not fail the verdict."""
    path = tmp_path / "injected-loss.toml"
    path.write_text(INJECTED)
    report = run_scenario(Options(scenario=load_scenario(str(path)), report_dir=tmp_path / "report", url=server.url,
                                  secret=SECRET, workers=1))
    (impaired,) = report["impaired"]
    assert impaired["drop_every"] == 25 and impaired["injected_drops"] > 40
    truth = 100.0 * impaired["injected_drops"] / impaired["rtp_seen_by_filter"]
    assert abs(impaired["measured_loss_raw_pct"] - 4.0) <= 0.5, impaired
    assert abs(impaired["measured_loss_raw_pct"] - truth) <= 0.25, (impaired, truth)
    assert impaired["nacks_sent"] > 0 and impaired["packets_repaired"] > 0.8 * impaired["injected_drops"]
    assert impaired["measured_loss_residual_pct"] < 0.5
    others = [s for s in report["students"] if not s["impaired"]]
    assert len(others) == 2 and all(s["loss_raw_pct"] < 0.5 for s in others)
    assert report["verdict"] == "pass", report["objectives"]


def test_replay_is_skipped_cleanly_without_recordings(fresh_server: ServerProcess, tmp_path: Path) -> None:
    """``replay-evening`` against a deployment with nothing recorded: verdict "skipped", exit 0."""
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exit_info:
        skyclass_main(["--log-level", "WARNING", "loadtest", "replay-evening", "--url", fresh_server.url,
                       "--secret", SECRET, "--report", str(out), "--scale", "0.001", "--workers", "1", "--quiet"])
    assert exit_info.value.code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "skipped" and report["plan"]["replay_viewers"] == 0
    assert all(row["status"] == "skipped" for row in report["objectives"])
    assert any("no recordings" in note for note in report["notes"])


def test_rehearsal_on_a_local_two_node_cluster(tmp_path: Path) -> None:
    """``--nodes 2``: two servers on a throwaway Redis; the teacher reaches one node and the
    students are spread over both (as by a load balancer), so the other node relays the room.
    The verdict, and the server figures summed over both nodes."""
    require_binary("/usr/bin/redis-server")
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exit_info:
        skyclass_main(["--log-level", "WARNING", "loadtest", "rehearsal", "--nodes", "2", "--server-workers", "1",
                       "--report", str(out), "--scale", "0.5", "--workers", "2", "--quiet"])
    assert exit_info.value.code == 0, (out / "report.json").read_text()[:3000] if (out / "report.json").exists() else ""
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "pass", report["objectives"]
    assert len(report["target"]["nodes"]) == 2 and report["target"]["fan_out_workers"] == 2, report["target"]
    joins = report["summary"]["joins"]
    assert joins["joined"] == joins["attempted"] == report["plan"]["sessions"]
    assert report["summary"]["cost"]["server_cpu_cores"] > 0
    # the second node served its share of the students by relaying the room from the first
    assert "relayed from node lt-node-0" in (out / "server-node1.log").read_text()
