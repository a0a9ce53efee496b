"""Smoke run of the recording benchmark: it still works end to end (the full run never runs here)."""

from __future__ import annotations

import json

from skyclass.loadtest import record_bench


def test_record_bench_smoke(capsys) -> None:
    record_bench.main(["--quick"])
    out = capsys.readouterr().out.strip().splitlines()
    assert "recording one lesson" in "\n".join(out[:-1])  # the table comes before the JSON
    results = json.loads(out[-1])
    summary = results["summary"]
    assert results["replay"]["state"] == "complete" and results["replay"]["segments"] >= 1
    assert summary["vod_after_end_s"] is not None and summary["vod_after_end_s"] < 5
    assert 0 <= summary["recording_thread_pct_core"] < 5  # 2 s windows: clock-tick resolution
    for name in ("skyclass", "aiohttp_static", "http_server"):
        row = results["serving"][name]
        assert row["errors"] == 0 and row["requests_per_s"] > 0, (name, row)
