"""Server configuration: one dataclass, filled from command-line flags and SKYCLASS_* variables."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class Config:
    host: str = "0.0.0.0"
    port: int = 8080
    data: Path = Path("data")
    redis: Optional[str] = None
    secret: str = ""
    ice_addresses: list[str] = field(default_factory=list)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # 0 = fan out in the front process
    max_viewers_per_worker: int = 150
    peer_timeout: float = 10.0
    keyframe_interval: float = 0.5
    public_url: Optional[str] = None
    # Recording: every lesson is recorded unless its room matches one of these (fnmatch; "*" = none).
    no_record: list[str] = field(default_factory=list)
    record_grace: Optional[float] = None  # wait for a lost teacher this long (default: peer_timeout)
    node_id: str = ""  # this node's name in the shared state (default: hostname:port)
    # Where this node's cross-node relay origin listens (with --redis): HOST[:PORT]; other
    # nodes' edges subscribe there to rooms whose teacher publishes here.
    relay_address: str = "127.0.0.1"

    def base_url(self, wildcard_host: Optional[str] = None) -> str:
        """Where others reach this node: ``--public-url``, else the listening address, a wildcard
        address standing for ``wildcard_host`` (default the host's name, which other nodes can
        resolve; demo links printed for the person at this machine pass "localhost")."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.host if self.host not in ("0.0.0.0", "::", "") else (wildcard_host or socket.getfqdn())
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def resolved_secret(self) -> str:
        """The configured secret, or one kept under the data directory so tokens survive restarts."""
        if self.secret:
            return self.secret
        path = self.data / "secret"
        if path.exists():
            return path.read_text().strip()
        self.data.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(32)
        path.write_text(value)
        path.chmod(0o600)
        return value


def _env(name: str) -> Optional[str]:
    return os.environ.get("SKYCLASS_" + name.upper().replace("-", "_"))


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``skyclass serve``; each defaults to its SKYCLASS_* variable, then to Config's default."""
    d = Config()

    def env_or(name: str, default: object) -> object:
        value = _env(name)
        return default if value is None else value

    parser.add_argument("--host", default=env_or("host", d.host))
    parser.add_argument("--port", type=int, default=int(env_or("port", d.port)))
    parser.add_argument("--data", type=Path, default=Path(str(env_or("data", d.data))))
    parser.add_argument("--redis", default=env_or("redis", None), help="redis://host:port/db for multi-node state")
    parser.add_argument("--secret", default=env_or("secret", ""), help="token signing secret (default: kept in DATA/secret)")
    ice_env = _env("ice_address")
    parser.add_argument(
        "--ice-address",
        dest="ice_addresses",
        action="append",
        default=None,
        help="host candidate address to offer (repeatable; default: all non-loopback interfaces)",
    )
    parser.set_defaults(_ice_env=ice_env.split(",") if ice_env else [])
    parser.add_argument(
        "--workers", type=int, default=int(env_or("workers", d.workers)),
        help="fan-out worker processes (default: one per core; 0 = fan out in the front process)",
    )
    parser.add_argument(
        "--max-viewers-per-worker", type=int, default=int(env_or("max_viewers_per_worker", d.max_viewers_per_worker))
    )
    parser.add_argument(
        "--peer-timeout", type=float, default=float(env_or("peer_timeout", d.peer_timeout)),
        help="seconds without ICE consent before a vanished peer is dropped",
    )
    parser.add_argument("--public-url", default=env_or("public_url", None), help="base URL of this node: demo links, and where other nodes redirect replays it holds")
    no_record_env = _env("no_record")
    parser.add_argument(
        "--no-record", dest="no_record", action="append", default=None, metavar="ROOM",
        help="do not record this room (repeatable; fnmatch patterns such as 'tutoring-*'; '*' records nothing)",
    )
    parser.set_defaults(_no_record_env=[r for r in no_record_env.split(",") if r] if no_record_env else [])
    grace_env = env_or("record_grace", None)
    parser.add_argument(
        "--record-grace", type=float, default=float(grace_env) if grace_env is not None else None,
        help="seconds to wait for a teacher whose connection was lost before closing the recording "
             "(default: the peer timeout)",
    )
    parser.add_argument("--node-id", default=env_or("node_id", ""),
                        help="this node's id in the shared (Redis) state; default hostname:port")
    parser.add_argument("--relay-address", default=env_or("relay_address", d.relay_address),
                        help="HOST[:PORT] where other nodes (with --redis) subscribe to rooms taught here: "
                             "an address they reach on the private network (default 127.0.0.1: one machine)")


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        host=args.host,
        port=args.port,
        data=args.data,
        redis=args.redis or None,
        secret=args.secret,
        ice_addresses=args.ice_addresses or args._ice_env,
        workers=args.workers,
        max_viewers_per_worker=args.max_viewers_per_worker,
        peer_timeout=args.peer_timeout,
        public_url=args.public_url,
        no_record=args.no_record or args._no_record_env,
        record_grace=args.record_grace,
        node_id=args.node_id,
        relay_address=args.relay_address,
    )
