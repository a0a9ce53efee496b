"""``skyclass timetable import FILE`` / ``skyclass timetable list``.

Import writes straight into the store the server uses — Redis with ``--redis`` (or
SKYCLASS_REDIS), else the in-process store's file under ``--data`` (a running server
notices the change) — or, with ``--url``, posts to a running server's API with an ops
token signed by the server secret.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import date as Date
from pathlib import Path
from typing import Optional

from .config import Config
from .state import make_state
from .timetable import Lesson, Timetable, TimetableError, parse_file
from .tokens import issue_token


def _day(text: Optional[str]) -> Date:
    if not text or text == "today":
        return Date.today()
    return Date.fromisoformat(text)


async def _store_lessons(args: argparse.Namespace, lessons: list[Lesson]) -> None:
    state = make_state("cli", args.redis, args.data)
    try:
        await Timetable(state).save(lessons, replace=args.replace)
    finally:
        if args.redis:
            await state.close()


async def _post_lessons(args: argparse.Namespace, lessons: list[Lesson]) -> None:
    import aiohttp

    secret = Config(data=args.data, secret=args.secret or "").resolved_secret()
    token = issue_token(secret, "ops", "*", "timetable import", 600)
    body = {"lessons": [l.to_json() for l in lessons], "replace": args.replace}
    async with aiohttp.ClientSession() as http:
        async with http.post(args.url.rstrip("/") + "/api/timetable", json=body,
                             headers={"Authorization": f"Bearer {token}"}) as resp:
            if resp.status != 201:
                raise TimetableError(f"server refused the import: {resp.status} {await resp.text()}")


def _cmd_import(args: argparse.Namespace) -> int:
    try:
        lessons = parse_file(Path(args.file), _day(args.date))
        asyncio.run(_post_lessons(args, lessons) if args.url else _store_lessons(args, lessons))
    except (OSError, ValueError) as exc:  # TimetableError is a ValueError
        sys.stderr.write(f"skyclass timetable import: {exc}\n")
        return 2
    where = args.url or (args.redis or f"{args.data} (in-process store)")
    sys.stdout.write(f"imported {len(lessons)} lesson(s) into {where}\n")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    async def run() -> list[Lesson]:
        state = make_state("cli", args.redis, args.data)
        try:
            timetable = Timetable(state)
            return await (timetable.all() if args.date == "all" else timetable.on_day(_day(args.date)))
        finally:
            if args.redis:
                await state.close()

    lessons = asyncio.run(run())
    if args.json:
        sys.stdout.write(json.dumps([l.to_json() for l in lessons], indent=1) + "\n")
        return 0
    for l in lessons:
        when = f"{l.to_json()['start_iso']}–{l.to_json()['end_iso'][-5:]}"
        audience = l.audience + (f" {l.school}" if l.school else "") + (f" {l.klass}" if l.klass else "")
        sys.stdout.write(f"{when}  {l.id:<34} {l.room:<24} {l.kind:<8} grade {l.grade or '-':<3} "
                         f"{l.subject:<12} {audience:<20} {l.teacher}\n")
    return 0


def add_timetable_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("timetable", help="import or list the timetable")
    commands = parser.add_subparsers(dest="timetable_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", type=Path, default=Path(os.environ.get("SKYCLASS_DATA", "data")))
        p.add_argument("--redis", default=os.environ.get("SKYCLASS_REDIS") or None,
                       help="the servers' Redis (default: the in-process store under --data)")

    imp = commands.add_parser("import", help="load lessons from a CSV or TOML file (upsert by id)")
    imp.add_argument("file")
    imp.add_argument("--date", default=None, help="day for HH:MM times without a date column (default: today)")
    imp.add_argument("--replace", action="store_true", help="drop every existing lesson first")
    imp.add_argument("--url", default=None, help="post to a running server's API instead of the store")
    imp.add_argument("--secret", default=os.environ.get("SKYCLASS_SECRET", ""), help="with --url: the server secret")
    common(imp)
    imp.set_defaults(func=_cmd_import)

    lst = commands.add_parser("list", help="print a day's lessons")
    lst.add_argument("--date", default="today", help="YYYY-MM-DD, today or all")
    lst.add_argument("--json", action="store_true")
    common(lst)
    lst.set_defaults(func=_cmd_list)
