"""Signed access tokens: HS256 JWTs over the server secret saying who may do what in which room."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Optional

import jwt

ROLES = ("teacher", "assistant", "student", "ops")

# What each role may do by default; a token may carry a narrower list.
ROLE_GRANTS: dict[str, tuple[str, ...]] = {
    "teacher": ("publish", "subscribe", "chat", "moderate"),
    "assistant": ("subscribe", "chat", "moderate"),
    "student": ("subscribe", "chat"),
    "ops": ("subscribe", "moderate", "ops"),
}

ALGORITHM = "HS256"


class TokenError(Exception):
    """The token is missing, malformed, expired or not signed by us."""


@dataclass(frozen=True)
class Claims:
    name: str
    role: str
    room: str
    grants: tuple[str, ...]
    expires_at: int
    extra: dict = field(default_factory=dict)
    # A unique token id, so one token can be revoked without touching its holder's others.
    jti: str = ""

    def may(self, grant: str, room: str) -> bool:
        """True if this token allows ``grant`` in ``room`` ("*" is every room)."""
        return grant in self.grants and self.room in (room, "*")


def parse_ttl(text: str) -> int:
    """'8h', '30m', '45s', '2d' or plain seconds → seconds."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def issue_token(
    secret: str,
    role: str,
    room: str,
    name: str,
    ttl_seconds: int = 8 * 3600,
    grants: Optional[tuple[str, ...]] = None,
    extra: Optional[dict] = None,
) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    now = int(time.time())
    payload = {
        "sub": name,
        "role": role,
        "room": room,
        "grants": list(grants if grants is not None else ROLE_GRANTS[role]),
        "iat": now,
        "exp": now + ttl_seconds,
        "jti": secrets.token_urlsafe(12),
    }
    if extra:
        payload.update({k: v for k, v in extra.items() if k not in payload})
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str) -> Claims:
    try:
        payload = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub", "role", "room"]})
    except jwt.ExpiredSignatureError as exc:
        raise TokenError("token expired") from exc
    except jwt.InvalidTokenError as exc:
        raise TokenError(f"invalid token: {exc}") from exc
    role = payload["role"]
    if role not in ROLES:
        raise TokenError(f"unknown role {role!r}")
    grants = payload.get("grants", ROLE_GRANTS[role])
    known = {"sub", "role", "room", "grants", "iat", "exp", "jti"}
    return Claims(
        name=str(payload["sub"]),
        role=role,
        room=str(payload["room"]),
        grants=tuple(grants),
        expires_at=int(payload["exp"]),
        extra={k: v for k, v in payload.items() if k not in known},
        jti=str(payload.get("jti", "")),
    )
