"""Classroom pieces without a server: the state contract on both stores (in-process and a real
redis-server), attendance merging, timetable files and admission rules, rate-limit buckets."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import date
from pathlib import Path
from typing import AsyncIterator

import pytest

from skyclass.server.attendance import Attendance, report_csv
from skyclass.server.events import Bucket
from skyclass.server.state import InProcessState, RedisState, State
from skyclass.server.timetable import (
    Timetable,
    TimetableError,
    lesson_from_dict,
    parse_csv,
    parse_file,
    parse_toml,
)
from skyclass.server.tokens import issue_token, verify_token

ROOT = Path(__file__).resolve().parent.parent
DAY = date(2026, 3, 2)


@pytest.fixture(params=["inprocess", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[State]:
    if request.param == "inprocess":
        state: State = InProcessState("node-a", tmp_path)
    else:
        url = request.getfixturevalue("redis_url")
        state = RedisState("node-a", url, prefix=f"t{secrets.token_hex(4)}:")
    await state.start()
    yield state
    await state.close()


async def test_events_reach_every_subscriber(store: State) -> None:
    got: list[tuple[str, dict]] = []
    store.subscribe(lambda room, env: got.append((room, env)))
    await store.publish("r1", {"to": "all", "msg": "{}"})
    await store.publish("r2", {"to": "staff", "n": 2})
    for _ in range(100):
        if len(got) == 2:
            break
        await asyncio.sleep(0.01)
    assert got == [("r1", {"to": "all", "msg": "{}"}), ("r2", {"to": "staff", "n": 2})]


async def test_floor_swap_returns_previous(store: State) -> None:
    assert await store.floor("r") is None
    assert await store.swap_floor("r", {"holder": "ann"}) is None
    assert await store.swap_floor("r", {"holder": "bob"}) == {"holder": "ann"}
    assert (await store.floor("r"))["holder"] == "bob"
    assert await store.swap_floor("r", None) == {"holder": "bob"}
    assert await store.floor("r") is None


async def test_history_range_and_limit(store: State) -> None:
    for i in range(10):
        await store.append_history("r", {"id": f"e{i}", "ts": 1000.0 + i, "text": str(i)})
    assert [e["id"] for e in await store.history("r")] == [f"e{i}" for i in range(10)]
    assert [e["id"] for e in await store.history("r", since=1003, until=1005)] == ["e3", "e4", "e5"]
    assert [e["id"] for e in await store.history("r", limit=2)] == ["e8", "e9"]
    assert await store.history("other") == []


async def test_questions_hands_live_presence(store: State) -> None:
    await store.put_question("lesson1", {"id": "q2", "ts": 2.0, "text": "b"})
    await store.put_question("lesson1", {"id": "q1", "ts": 1.0, "text": "a"})
    assert [q["id"] for q in await store.questions("lesson1")] == ["q1", "q2"]
    await store.put_question("lesson1", {"id": "q1", "ts": 1.0, "text": "a", "answered": True})
    assert (await store.question("lesson1", "q1"))["answered"] is True
    assert await store.set_hand("r", "ann", True) is True
    assert await store.set_hand("r", "ann", True) is False
    await asyncio.sleep(0.01)
    await store.set_hand("r", "bob", True)
    assert [h["name"] for h in await store.hands("r")] == ["ann", "bob"]
    assert await store.set_hand("r", "ann", False) is True
    await store.clear_hands("r")
    assert await store.hands("r") == []
    await store.set_live("r", {"teacher": "T"})
    assert (await store.live("r")) == {"teacher": "T"}
    await store.put_presence("r", "n1", {"counts": {"student": 3}, "ts": time.time()})
    await store.put_presence("r", "n2", {"counts": {"student": 4}, "ts": time.time()})
    assert sorted(await store.presence("r")) == ["n1", "n2"]
    await store.put_presence("r", "n1", None)
    assert list(await store.presence("r")) == ["n2"]


async def test_rooms_nodes_revocations_bans(store: State) -> None:
    await store.set_room_node("r", "n1", 30)
    assert await store.room_node("r") == "n1"
    await store.clear_room_node("r", "n2")  # not the owner: no effect
    assert await store.room_nodes() == {"r": "n1"}
    await store.clear_room_node("r", "n1")
    assert await store.room_node("r") is None
    assert not await store.is_revoked("j1")
    await store.revoke("j1", time.time() + 60)
    assert await store.is_revoked("j1")
    await store.ban("r", "ann", time.time() + 60)
    assert await store.is_banned("r", "ann") and not await store.is_banned("r", "bob")
    await store.revoke("j2", time.time() - 10)  # already expired: nothing to refuse
    await asyncio.sleep(1.1)
    assert not await store.is_revoked("j2")


async def test_timetable_in_store_and_version(store: State) -> None:
    timetable = Timetable(store)
    v0 = await store.timetable_version()
    now = time.time()
    a = lesson_from_dict({"room": "ra", "subject": "maths", "teacher": "T", "start": now, "end": now + 600})
    b = lesson_from_dict({"room": "rb", "subject": "art", "teacher": "U", "start": now, "end": now + 600,
                          "kind": "qa"})
    await timetable.save([a, b])
    assert await store.timetable_version() != v0
    assert (await timetable.current("ra")).id == a.id
    assert await timetable.governs("rb") and not await timetable.governs("rc")
    clash = lesson_from_dict({"room": "ra", "subject": "x", "teacher": "T", "start": now + 700, "end": now + 900})
    with pytest.raises(TimetableError, match="overlap"):
        await timetable.save([clash])
    assert await timetable.delete(b.id)
    assert not await timetable.governs("rb")
    assert [l.id for l in await timetable.all()] == [a.id]


async def test_attendance_merges_nodes_and_replay(store: State) -> None:
    a, b = Attendance(store, "node-a"), Attendance(store, "node-b")
    t0 = time.time() - 100
    a.join("L1", "ann", "student", "ws:1", now=t0)
    b.join("L1", "ann", "student", "whep:1", now=t0 + 10)   # the same student on another node
    a.leave("ws:1", now=t0 + 40)
    b.leave("whep:1", now=t0 + 50)
    a.join("L1", "ann", "student", "ws:2", now=t0 + 70)     # back again, still there
    a.join("L1", "T", "teacher", "whip:1", now=t0)
    await a.flush()
    await b.flush()
    await a.add_watch("L1", "bob", 30)
    await a.add_watch("L1", "bob", 15)
    report = await a.report("L1", now=t0 + 100)
    people = {p["name"]: p for p in report["participants"]}
    assert people["ann"]["live_seconds"] == pytest.approx(80, abs=0.5)  # 0–50 and 70–100, not 40+40+30
    assert people["ann"]["present"] is True and people["ann"]["joins"] == 3
    assert people["T"]["role"] == "teacher"
    assert people["bob"]["live_seconds"] == 0 and people["bob"]["replay_seconds"] == 45
    assert report["totals"]["students_replay_only"] == 1
    csv_text = report_csv(report)
    assert csv_text.splitlines()[0].startswith("name,role,present")
    assert "bob,student,no" in csv_text


def test_timetable_files_and_errors() -> None:
    lessons = parse_file(ROOT / "examples" / "district-day.csv", DAY)
    kinds = {l.kind for l in lessons}
    assert kinds == {"lesson", "qa", "tutoring"} and len(lessons) >= 20
    assert len(parse_file(ROOT / "examples" / "district-day.toml", DAY)) == 3
    with pytest.raises(TimetableError, match="line 2: 'teacher' is required"):
        parse_csv("start,end,room,subject,teacher\n08:00,09:00,r1,maths,\n", DAY)
    with pytest.raises(TimetableError, match="line 3: end must be after start"):
        parse_csv("start,end,room,subject,teacher\n08:00,09:00,r1,m,T\n10:00,09:00,r2,m,T\n", DAY)
    with pytest.raises(TimetableError, match="kind 'lecture'"):
        parse_csv("start,end,room,subject,teacher,kind\n08:00,09:00,r1,m,T,lecture\n", DAY)
    with pytest.raises(TimetableError, match="needs a date"):
        parse_csv("start,end,room,subject,teacher\n08:00,09:00,r1,m,T\n", None)
    with pytest.raises(TimetableError, match="audience class needs a 'class'"):
        parse_toml('[[lesson]]\nstart="08:00"\nend="09:00"\nroom="r"\nsubject="m"\nteacher="T"\n'
                   'audience="class"\nschool="north"\n', DAY)
    with pytest.raises(TimetableError, match="room"):
        parse_csv("start,end,room,subject,teacher\n08:00,09:00,../etc,m,T\n", DAY)
    iso = parse_csv("start,end,room,subject,teacher\n2026-03-02T08:00:00+00:00,2026-03-02T09:00:00+00:00,r,m,T\n")
    assert iso[0].end - iso[0].start == 3600


def test_audience_admission() -> None:
    secret = "x" * 32
    lesson = lesson_from_dict({"room": "qa-north-7b", "subject": "m", "teacher": "T", "start": 0, "end": 60,
                               "grade": "7", "audience": "class", "school": "north", "class": "7B", "kind": "qa"})

    def claims(room: str, **extra: str):
        return verify_token(secret, issue_token(secret, "student", room, "s", 60, extra=extra))

    assert lesson.admits_student(claims("qa-north-7b")) is None
    assert lesson.admits_student(claims("*", grade="7", school="north", **{"class": "7B"})) is None
    assert "class 7B" in lesson.admits_student(claims("*", grade="7", school="north", **{"class": "7A"}))
    assert "school north" in lesson.admits_student(claims("*", grade="7", school="south", **{"class": "7B"}))
    assert "grade 7" in lesson.admits_student(claims("*", grade="8"))
    assert "not 'qa-north-7b'" in lesson.admits_student(claims("other-room"))


def test_rate_limit_bucket() -> None:
    bucket = Bucket(capacity=3, rate=0.5)
    assert [bucket.take(100.0) for _ in range(3)] == [0, 0, 0]
    assert bucket.take(100.0) == pytest.approx(2.0)
    assert bucket.take(102.0) == 0


async def test_join_lookups_in_one_go(store: State) -> None:
    """The batched reads a join makes agree with the single ones."""
    await store.append_history("r", {"id": "h1", "ts": 10.0, "text": "x"})
    await store.put_question("L", {"id": "q1", "ts": 1.0})
    await store.swap_floor("r", {"holder": "ann"})
    await store.set_hand("r", "bob", True)
    await store.set_live("r", {"teacher": "T"})
    snap = await store.room_snapshot("r", "L", since=0, limit=10)
    assert [e["id"] for e in snap["history"]] == ["h1"] and [q["id"] for q in snap["questions"]] == ["q1"]
    assert snap["floor"]["holder"] == "ann" and [h["name"] for h in snap["hands"]] == ["bob"]
    assert snap["live"] == {"teacher": "T"}
    await store.revoke("j", time.time() + 60)
    await store.ban("r", "bob", time.time() + 60)
    assert await store.revoked_or_banned("j", "r", "bob") == (True, True)
    assert await store.revoked_or_banned("", "r", "ann") == (False, False)
