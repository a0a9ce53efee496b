"""``skyclass`` command line: serve, token (and loadtest, in skyclass.loadtest)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import asyncio
import logging
import sys
from typing import Optional

from aiohttp import web

from .config import Config, add_serve_arguments, config_from_args
from .timetable_cli import add_timetable_parser
from .tokens import ROLES, issue_token, parse_ttl

logger = logging.getLogger("skyclass")

DEMO_ROOM = "demo"


def demo_links(config: Config, secret: str) -> tuple[str, str]:
    base = config.base_url(wildcard_host="localhost")
    teacher = issue_token(secret, "teacher", DEMO_ROOM, "Demo Teacher")
    student = issue_token(secret, "student", DEMO_ROOM, "Demo Student")
    return f"{base}/teach/{DEMO_ROOM}?token={teacher}", f"{base}/watch/{DEMO_ROOM}?token={student}"


async def _serve(config: Config) -> None:
    from .app import create_app

    app = create_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    await site.start()
    teacher, student = demo_links(config, app["secret"])
    # The links are the product's start screen for a newcomer: stdout, on purpose.
    sys.stdout.write(
        f"skyclass serving on {config.base_url(wildcard_host='localhost')} (data: {config.data}, state: "
        f"{'redis ' + config.redis if config.redis else 'in-process'})\n"
        f"  teacher: {teacher}\n  student: {student}\n"
    )
    sys.stdout.flush()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _cmd_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    config.data.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(_serve(config))
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    config = Config(data=args.data, secret=args.secret or "")
    secret = config.resolved_secret()
    extra = {k: v for k, v in (("school", args.school), ("grade", args.grade), ("class", args.klass)) if v}
    print(issue_token(secret, args.role, args.room, args.name, parse_ttl(args.ttl), extra=extra or None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skyclass", description="live classroom streaming and replay server")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    add_serve_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    token = sub.add_parser("token", help="print a signed access token")
    token.add_argument("--role", required=True, choices=ROLES)
    token.add_argument("--room", required=True, help="room name, or * for every room")
    token.add_argument("--name", required=True)
    token.add_argument("--ttl", default="8h", help="lifetime, e.g. 8h, 30m, 3600")
    token.add_argument("--secret", default=os.environ.get("SKYCLASS_SECRET", ""))
    token.add_argument("--data", default=os.environ.get("SKYCLASS_DATA", "data"), type=Path)
    # Audience claims: with --room '*', a student token admits to the lessons of its grade/school/class.
    token.add_argument("--school", default=None)
    token.add_argument("--grade", default=None)
    token.add_argument("--class", dest="klass", default=None)
    token.set_defaults(func=_cmd_token)

    add_timetable_parser(sub)

    try:
        from skyclass.loadtest.cli import add_loadtest_parser
    except ImportError:
        pass
    else:
        add_loadtest_parser(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
