"""Smoke run of the fault benchmark (overload and a killed worker, 3 seats per worker)."""

from __future__ import annotations

import json

from skyclass.loadtest import faults_bench


def test_faults_bench_smoke(capsys) -> None:
    status = faults_bench.main(["--quick"])
    out = capsys.readouterr().out.strip().splitlines()
    assert "survivors" in "\n".join(out[:-1])  # the table comes before the JSON
    results = json.loads(out[-1])
    overload, kill = results["overload"], results["kill"]
    assert overload["offered"] == 12 and overload["capacity"] == 6
    assert overload["admitted"] == 6 and overload["refused_with_503_retry_after"] == 6, overload
    assert overload["readyz_ready_when_full"] is False
    assert overload["admitted_receiving"] == 6 and overload["admitted_loss_pct_max"] is not None
    assert kill["victim_students"] == 3 and kill["survivors_expected"] == 3, kill
    assert kill["survivors"] == 3 and kill["stalled"] == 3, kill
    assert kill["rejoin_attempts"] == 3 and kill["rejoined"] == 3, kill
    assert kill["worker_restarted_after_s"] is not None
    # the verdict follows the figures (loss on a loaded CI machine is not asserted here)
    assert status == (0 if all(results["targets"].values()) else 1)
