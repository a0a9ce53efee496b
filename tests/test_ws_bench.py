"""Smoke run of the classroom events benchmark: it still works end to end (the full run never runs here)."""

from __future__ import annotations

import json

from skyclass.loadtest import ws_bench


def test_ws_bench_smoke(capsys) -> None:
    ws_bench.main(["--clients", "30", "--questions", "10", "--question-seconds", "0.5", "--lesson", "60",
                   "--window", "2", "--idle-window", "0.5", "--settle", "0.2", "--lesson-settle", "0.3",
                   "--churn", "4", "--procs", "2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert "p95 ms" in "\n".join(out[:-1]) and "teacher chats to all" in "\n".join(out[:-1])
    results = json.loads(out[-1])
    latency, lesson = results["latency"], results["lesson"]
    assert latency["clients"] == 30 and latency["delivered"] == latency["questions"] == 10
    assert 0 < latency["p95_ms"] < 1000
    assert lesson["students"] == 60
    for window in (lesson["student_chat"], lesson["broadcast"]):
        assert window["chat_sent"] >= 2 and window["churned"] > 0, window
        assert window["chat_delivered_pct"] > 90, window
        assert 0 <= window["cpu_pct"] < 100
    assert set(results["pass"]) == {"question_p95_under_200ms", "lesson_cpu_under_10pct", "broadcast_cpu_under_10pct"}
