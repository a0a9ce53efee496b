"""Who is asking: bearer tokens on WHIP/WHEP/API, ``?token=`` on pages and websockets."""

from __future__ import annotations

from aiohttp import web

from .errors import HttpError
from .tokens import Claims, TokenError, verify_token


def request_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise HttpError(401, "unauthorized", "Authorization must be 'Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
        return value.strip()
    token = request.query.get("token", "")
    if not token:
        raise HttpError(401, "unauthorized", "missing token (Authorization: Bearer <token>)",
                        headers={"WWW-Authenticate": "Bearer"})
    return token


def authenticate(request: web.Request) -> Claims:
    try:
        return verify_token(request.app["secret"], request_token(request))
    except TokenError as exc:
        raise HttpError(401, "unauthorized", str(exc), headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def require_grant(request: web.Request, grant: str, room: str) -> Claims:
    """The caller's claims, or 401 (no/bad token) / 403 (valid token, not allowed here)."""
    claims = authenticate(request)
    if not claims.may(grant, room):
        if claims.room not in (room, "*"):
            raise HttpError(403, "forbidden", f"token is for room {claims.room!r}, not {room!r}")
        raise HttpError(403, "forbidden", f"role {claims.role!r} may not {grant} here")
    return claims
