"""``skyclass loadtest``: rehearse a school day against a deployment and judge it.

    skyclass loadtest SCENARIO --url URL --report DIR [--scale S] [--workers N]
                      [--secret S] [--find-capacity] [--server-workers N] ...

``SCENARIO`` is a shipped name (``rehearsal``, ``district-morning``, ``afternoon-qa``,
``replay-evening``) or a path to a TOML file. ``--url local`` (the default) starts a
server on this machine; any other URL is a deployment, whose token secret the harness
needs (``--secret`` or ``SKYCLASS_SECRET``) to sign teachers' and students' tokens.

Exit status: 0 the verdict passed (or was skipped: nothing to judge, e.g. no recordings to
replay), 1 an objective failed, 2 the run could not be carried out.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from .report import TerminalProgress, terminal_summary, write_report
from .scenario import ScenarioError, available_scenarios, load_scenario

logger = logging.getLogger(__name__)

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", help=f"shipped scenario ({', '.join(available_scenarios())}) or a TOML file")
    parser.add_argument("--url", default="local",
                        help="the deployment's base URL (several nodes: comma-separated, students spread over them), "
                             "or 'local' (default) to start a server on this machine")
    parser.add_argument("--nodes", type=int, default=1,
                        help="with --url local: start this many servers sharing a throwaway redis-server (a cluster)")
    parser.add_argument("--report", type=Path, required=True, help="directory for report.json and report.html")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the scenario's counts (students, rooms or viewers, as it says); default 1")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="client processes of simulated students (default: half this machine's cores)")
    parser.add_argument("--secret", default=os.environ.get("SKYCLASS_SECRET", ""),
                        help="the deployment's token secret (default: $SKYCLASS_SECRET; not needed with --url local)")
    parser.add_argument("--find-capacity", action="store_true",
                        help="ramp students into one room until an objective breaks; report the largest count that "
                             "holds, per server core, and a plan for the scenario at full size")
    parser.add_argument("--room-prefix", default="lt-",
                        help="prefix of every room the harness uses (default 'lt-', so load never mixes with lessons)")
    parser.add_argument("--server-workers", type=int, default=None,
                        help="with --url local: the server's fan-out processes (default: the scenario's, else one per core)")
    parser.add_argument("--max-viewers-per-worker", type=int, default=None,
                        help="with --url local: the server's admission cap per fan-out process")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the schedule (join times, who drops)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_loadtest_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``skyclass loadtest`` (server/cli.py calls this)."""
    parser = subparsers.add_parser("loadtest", help="rehearse a school day against a deployment and judge it",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run what the flags ask for; the exit code."""
    from .runner import HarnessError, Options, run_scenario  # heavy imports only when running

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        sys.stderr.write(f"skyclass loadtest: {exc}\n")
        return EXIT_ERROR
    if args.scale <= 0 or args.workers < 1 or args.nodes < 1:
        sys.stderr.write("skyclass loadtest: --scale must be > 0, --workers and --nodes >= 1\n")
        return EXIT_ERROR
    progress = None if args.quiet else TerminalProgress()

    def say(text: str) -> None:
        if progress is not None:
            progress.message(text)
        else:
            logger.info("%s", text)

    options = Options(scenario=scenario, report_dir=args.report, url=args.url, secret=args.secret or None,
                      scale=args.scale, workers=args.workers, room_prefix=args.room_prefix,
                      server_workers=args.server_workers, max_viewers_per_worker=args.max_viewers_per_worker,
                      nodes=args.nodes,
                      seed=args.seed, progress=progress, say=say)
    try:
        if args.find_capacity:
            from .capacity import find_capacity, capacity_charts

            report = find_capacity(options)
            charts = capacity_charts(report)
        else:
            report = run_scenario(options)
            charts = None
    except (HarnessError, ScenarioError) as exc:
        if progress:
            progress.end_line()
        sys.stderr.write(f"skyclass loadtest: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        if progress:
            progress.end_line()
        sys.stderr.write("skyclass loadtest: interrupted\n")
        return EXIT_ERROR
    if progress:
        progress.end_line()
    json_path, html_path = write_report(report, args.report, charts)
    # The summary is the command's output: stdout, on purpose.
    if report.get("capacity"):
        from .capacity import capacity_summary

        sys.stdout.write(capacity_summary(report) + "\n")
    else:
        sys.stdout.write(terminal_summary(report) + "\n")
    sys.stdout.write(f"report: {json_path} {html_path}\n")
    sys.stdout.flush()
    return {"pass": EXIT_PASS, "skipped": EXIT_PASS}.get(report["verdict"], EXIT_FAIL)


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m skyclass.loadtest.cli`` (same as ``skyclass loadtest``)."""
    parser = argparse.ArgumentParser(prog="skyclass loadtest", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(run_from_args(args))


if __name__ == "__main__":
    main()
