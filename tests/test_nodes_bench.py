"""Smoke run of the scale-out benchmark (two nodes on one Redis, a few students on each)."""

from __future__ import annotations

import json

from conftest import require_binary

from skyclass.loadtest import nodes_bench


def test_nodes_bench_smoke(capsys) -> None:
    require_binary("/usr/bin/redis-server")
    status = nodes_bench.main(["--quick"])
    out = capsys.readouterr().out.strip().splitlines()
    assert "what serving node b costs node a" in "\n".join(out[:-1])  # the table comes before the JSON
    results = json.loads(out[-1])
    summary, edge = results["summary"], results["edge"]
    assert status == 0 and summary["edge_students_receiving"] == 4, summary
    assert edge["n"] == 4 and edge["video_fps_min"] > 0, edge
    # node b got the room from node a (one relayed stream per track) and fanned it out to 4
    assert summary["edge_relay_pps_in"] > 0 and summary["edge_pps_out"] > 3 * summary["edge_relay_pps_in"], summary
    assert results["origin_alone_cores"] > 0 and results["edge_idle_cores"] >= 0
