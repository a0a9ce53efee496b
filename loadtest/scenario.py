"""Load-test scenarios as data: the district's school day in TOML files under ``loadtest/scenarios/``.

A scenario says who comes when (rooms, teachers, students, their ramp, who drops and
rejoins, who replays recordings), and what "holds" means (the service-level objectives).
Ops edit these files for their district instead of code; ``--scale`` shrinks or grows the
counts so the same day runs on a laptop or from a fleet. See ``scenarios/rehearsal.toml``
for an annotated example of every key.

Unknown keys are errors: a typo in an objective must not silently turn it off.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

SCALE_MODES = ("students", "rooms", "both", "none")
RAMP_SHAPES = ("uniform", "storm")
LEAVE_MODES = ("leave", "vanish")


class ScenarioError(ValueError):
    """The scenario file is missing, malformed or inconsistent."""


@dataclass
class RoomGroup:
    """Rooms that open together with the same shape: one teacher each, ``students`` per room.

    ``scale`` says which count ``--scale`` changes: a district lesson keeps its 9 grade
    rooms and shrinks each room's class ("students"); the afternoon's Q&A keeps each
    room's size and shrinks how many rooms open ("rooms").
    """

    name: str
    rooms: int = 1
    students: int = 10
    scale: str = "students"
    min_students: int = 1
    start: float = 0.0            # the teacher publishes this long after the run starts (s)
    teacher_lead: float = 2.0     # students start joining this long after the teacher (s)
    ramp: float = 10.0            # joins spread over this many seconds
    ramp_shape: str = "uniform"   # "storm": most students in the first part of the ramp
    lesson: float = 60.0          # the teacher stays live this long (s); students stay until it ends
    churn_pct: float = 0.0        # this share of students drops once during the lesson and rejoins
    churn_mode: str = "leave"     # "leave": polite DELETE; "vanish": the network disappears (no goodbye)
    rejoin_after: float = 5.0     # seconds between a drop and the rejoin

    def room_names(self, rooms: int) -> list[str]:
        """Room ``i`` is ``name`` formatted with ``i`` (1-based) when it has ``{i}``, else ``name-i``."""
        if rooms == 1 and "{i}" not in self.name:
            return [self.name]
        if "{i}" in self.name:
            return [self.name.replace("{i}", str(i)) for i in range(1, rooms + 1)]
        return [f"{self.name}-{i}" for i in range(1, rooms + 1)]


@dataclass
class ReplayGroup:
    """Students fetching recorded lessons over HLS at once (the evening's homework)."""

    name: str = "replay"
    viewers: int = 100
    scale: bool = True
    min_viewers: int = 1
    start: float = 0.0
    ramp: float = 10.0
    watch: float = 30.0           # seconds of media each viewer plays (or the whole lesson if shorter)
    buffer_ahead: float = 30.0    # like a player: fetch at most this far ahead of the playhead
    prepare_lesson: float = 16.0  # local server without recordings: record a lesson this long first


@dataclass
class Impairment:
    """A lossy network for some students: drop the first arrival of every ``drop_every``-th
    RTP packet before SRTP (retransmissions pass). These students are measured and
    reported but not held to the objectives: their loss is injected, not the server's."""

    room: str = ""                # a room name ("" = the first room of the first group)
    students: int = 1             # the first N students of that room
    drop_every: int = 20


@dataclass
class Objectives:
    """Service-level objectives: the verdict passes when every one that is set holds."""

    join_success_pct: Optional[float] = 99.5    # joins that reach media, of all attempts (>=)
    first_keyframe_p95_s: Optional[float] = 3.0  # request to first keyframe, 95th percentile (<)
    loss_p95_pct: Optional[float] = 1.0          # students' packet loss before repair, 95th percentile (<)
    residual_loss_p95_pct: Optional[float] = None  # after NACK repair (<)
    freeze_pct: Optional[float] = 1.0            # frozen video time of all watch time (<)
    delay_p95_ms: Optional[float] = 400.0        # end-to-end delay of video frames, 95th percentile (<)
    teacher_success_pct: Optional[float] = 100.0  # teachers that went live (>=)
    replay_success_pct: Optional[float] = 99.5   # replay viewers who played what they asked for (>=)
    replay_startup_p95_s: Optional[float] = 2.0  # playlist request to first segment, 95th percentile (<)
    replay_stall_pct: Optional[float] = 1.0      # stalled time of all replay watch time (<)


@dataclass
class Capacity:
    """``--find-capacity``: one room, students added in steps until an objective breaks."""

    start: int = 10
    step: int = 10
    max: int = 2000
    join_ramp: float = 3.0    # each step's students join over this many seconds
    settle: float = 3.0       # then wait this long
    window: float = 6.0       # then measure this long
    growth: float = 1.0       # step multiplier after each holding step (1 = linear)


@dataclass
class Teacher:
    """The simulated teacher's clip: encoded once, looped, only packetized while live."""

    width: int = 640
    height: int = 480
    fps: int = 30
    bitrate: int = 1_000_000
    clip_seconds: int = 4
    gop_seconds: float = 2.0


@dataclass
class RunSettings:
    sample_interval: float = 1.0   # seconds between samples of students and server
    join_timeout: float = 20.0     # from a student's first request until connected (s)
    join_concurrency: int = 16     # joins in flight per client process
    feedback: bool = True          # students send NACKs and PLIs like a browser
    server_workers: Optional[int] = None        # a local server's fan-out processes
    max_viewers_per_worker: Optional[int] = None
    drain: float = 2.0             # after the last lesson ends, before closing


@dataclass
class Plan:
    """The full-size district the capacity plan sizes servers for."""

    cores_per_server: int = 8
    headroom_pct: float = 30.0     # keep this share of every core free


@dataclass
class Scenario:
    name: str
    description: str = ""
    rooms: list[RoomGroup] = field(default_factory=list)
    replay: list[ReplayGroup] = field(default_factory=list)
    impairments: list[Impairment] = field(default_factory=list)
    objectives: Objectives = field(default_factory=Objectives)
    capacity: Capacity = field(default_factory=Capacity)
    teacher: Teacher = field(default_factory=Teacher)
    run: RunSettings = field(default_factory=RunSettings)
    plan: Plan = field(default_factory=Plan)
    path: Optional[str] = None

    # --- counts after --scale ----------------------------------------------------------

    def scaled_rooms(self, group: RoomGroup, scale: float) -> tuple[int, int]:
        """(rooms, students per room) of ``group`` at ``scale``."""
        rooms, students = group.rooms, group.students
        if group.scale in ("rooms", "both"):
            rooms = max(1, int(round(rooms * scale)))
        if group.scale in ("students", "both"):
            students = max(group.min_students, int(round(students * scale)))
        return rooms, students

    def scaled_viewers(self, group: ReplayGroup, scale: float) -> int:
        return max(group.min_viewers, int(round(group.viewers * scale))) if group.scale else group.viewers

    def full_size_students(self) -> int:
        """Live students of the whole scenario at scale 1 (what the capacity plan sizes for)."""
        return sum(g.rooms * g.students for g in self.rooms)

    def peak_students(self, scale: float) -> int:
        """Live students present at once at ``scale`` (groups whose lessons overlap add up)."""
        events: list[tuple[float, int]] = []
        for group in self.rooms:
            rooms, students = self.scaled_rooms(group, scale)
            events.append((group.start, rooms * students))
            events.append((group.start + group.lesson, -rooms * students))
        peak = current = 0
        for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
            current += delta
            peak = max(peak, current)
        return peak

    def duration(self) -> float:
        """Seconds from the run's start until the last lesson or replay ends."""
        ends = [g.start + g.lesson for g in self.rooms]
        ends += [g.start + g.ramp + g.watch + 10.0 for g in self.replay]
        return max(ends, default=0.0)


# --- loading --------------------------------------------------------------------------

def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: expected a table, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {}
    for key, value in data.items():
        default = getattr(cls, key, None) if not callable(getattr(cls, key, None)) else None
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ScenarioError(f"{where}.{key}: expected true or false")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ScenarioError(f"{where}.{key}: expected a number, got {value!r}")
            if isinstance(default, float):
                value = float(value)
            elif isinstance(value, float):
                if not value.is_integer():
                    raise ScenarioError(f"{where}.{key}: expected a whole number, got {value!r}")
                value = int(value)
        values[key] = value
    try:
        return cls(**values)
    except TypeError as exc:
        raise ScenarioError(f"{where}: {exc}") from exc


def _check(scenario: Scenario) -> None:
    if not scenario.rooms and not scenario.replay:
        raise ScenarioError(f"{scenario.name}: no [[rooms]] and no [[replay]]: nothing to run")
    names: set[str] = set()
    for i, group in enumerate(scenario.rooms):
        where = f"{scenario.name}: rooms[{i}] ({group.name})"
        if group.scale not in SCALE_MODES:
            raise ScenarioError(f"{where}: scale must be one of {', '.join(SCALE_MODES)}")
        if group.ramp_shape not in RAMP_SHAPES:
            raise ScenarioError(f"{where}: ramp_shape must be one of {', '.join(RAMP_SHAPES)}")
        if group.churn_mode not in LEAVE_MODES:
            raise ScenarioError(f"{where}: churn_mode must be one of {', '.join(LEAVE_MODES)}")
        if group.rooms < 1 or group.students < 0 or group.lesson <= 0:
            raise ScenarioError(f"{where}: needs rooms >= 1, students >= 0, lesson > 0")
        if not 0 <= group.churn_pct <= 100:
            raise ScenarioError(f"{where}: churn_pct is a percentage")
        if group.teacher_lead + group.ramp >= group.lesson:
            raise ScenarioError(f"{where}: the ramp must end before the lesson does")
        for room in group.room_names(group.rooms):
            if room in names:
                raise ScenarioError(f"{where}: room {room} appears twice")
            names.add(room)
    for impairment in scenario.impairments:
        if impairment.drop_every < 2:
            raise ScenarioError(f"{scenario.name}: impairments.drop_every must be >= 2")
    if scenario.capacity.step < 1 or scenario.capacity.start < 1:
        raise ScenarioError(f"{scenario.name}: capacity.start and capacity.step must be >= 1")


def parse_scenario(data: dict, name: str, path: Optional[str] = None) -> Scenario:
    """A :class:`Scenario` from a parsed TOML document."""
    data = dict(data)
    scenario = Scenario(name=str(data.pop("name", name)), description=str(data.pop("description", "")), path=path)
    for key, cls, attr in (("rooms", RoomGroup, "rooms"), ("replay", ReplayGroup, "replay"),
                           ("impairments", Impairment, "impairments")):
        items = data.pop(key, [])
        if not isinstance(items, list):
            raise ScenarioError(f"{name}: {key} must be an array of tables ([[{key}]])")
        setattr(scenario, attr, [_build(cls, item, f"{name}: {key}[{i}]") for i, item in enumerate(items)])
    for key, cls in (("objectives", Objectives), ("capacity", Capacity), ("teacher", Teacher),
                     ("run", RunSettings), ("plan", Plan)):
        if key in data:
            setattr(scenario, key, _build(cls, data.pop(key), f"{name}: [{key}]"))
    if data:
        raise ScenarioError(f"{name}: unknown top-level key(s) {', '.join(sorted(data))}")
    _check(scenario)
    return scenario


def available_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load_scenario(name_or_path: str) -> Scenario:
    """A shipped scenario by name (``district-morning``) or any TOML file by path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise ScenarioError(f"no scenario {name_or_path!r}; shipped: {', '.join(available_scenarios())}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: {exc}") from exc
    return parse_scenario(data, path.stem, str(path))


def join_offsets(group: RoomGroup, count: int, rng: Any) -> list[float]:
    """Seconds after the ramp starts at which each of ``count`` students sends its request.

    "uniform" spreads them evenly; "storm" is the 8:00 rush: arrival times drawn so that
    about two thirds of the class arrives in the first third of the ramp (a truncated
    exponential), which is what a bell ringing does to a join rate.
    """
    if count <= 0:
        return []
    if group.ramp <= 0:
        return [0.0] * count
    if group.ramp_shape == "uniform":
        return [group.ramp * (i + 0.5) / count for i in range(count)]
    rate = 3.0  # 1 - e^-1 ≈ 63 % arrive in the first third
    offsets = []
    for i in range(count):
        u = (i + rng.random()) / count
        offsets.append(-math.log(1 - u * (1 - math.exp(-rate))) / rate * group.ramp)
    return sorted(offsets)
