"""Smoke run of the fan-out benchmark: it still works end to end (the full run never runs here)."""

from __future__ import annotations

import json

from skyclass.loadtest import fanout_bench


def test_fanout_bench_smoke(capsys) -> None:
    fanout_bench.main(["--quick", "--counts", "2", "--relay-counts", "1", "--duration", "2", "--settle", "1",
                       "--join-count", "2", "--join-window", "0.5", "--workers", "2",
                       "--worker-counts", "2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert "stu/core" in "\n".join(out[:-1])  # the table comes before the JSON
    results = json.loads(out[-1])

    raw = results["raw"]
    assert raw["protect_sendto_pps_per_core"] > 1000

    (row,) = results["fanout"]
    assert row["n"] == 2 and row["connected"] == 2 and row["silent"] == 0
    assert row["pps_per_student"] > 50, row  # ~180 pkt/s of video + audio
    assert row["loss_pct_max"] < 20, row
    assert row["video_fps_min"] > 10, row
    assert 0 < row["server_cpu_cores"] < 2, row
    assert row["forwarded_pps"] > 100, row

    (relay,) = results["relay"]
    assert relay["n"] == 1 and relay["pps_per_student"] > 20, relay

    workers = results["workers"]
    (ratio,) = workers["ratios"]
    assert ratio["n"] == 2 and ratio["single_cpu_per_student_pct"] > 0 and ratio["workers2_cpu_per_student_pct"] > 0
    assert 0 < workers["relay_hop"]["us_per_packet"] < 1000 and workers["relay_hop"]["delivered_pct"] > 50

    join = results["join"]
    assert join["saw_video"] == 2 and join["all_saw_video"], join
    assert 0 < join["keyframe_ms_p50"] <= join["keyframe_ms_max"] < 30000, join
