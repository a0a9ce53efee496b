"""Admission in front of the handlers: revoked tokens, kicked students, timetable windows.

A middleware rather than checks inside each handler, so WHIP/WHEP (server/signalling.py)
need not know about the classroom: a request carrying a valid token that has been
revoked gets 401; ``POST /whip|/whep/{room}`` and ``GET /ws/{room}`` for a room whose
lesson is not open now, for a student outside the lesson's audience, or for a student
the teacher removed get 403 with the reason. Requests with no or an invalid token pass
through, and the handler answers them as before (401).
"""

from __future__ import annotations

import logging
import re
from typing import Awaitable, Callable

from aiohttp import web

from .errors import HttpError
from .tokens import TokenError, verify_token

logger = logging.getLogger(__name__)

_JOIN = re.compile(r"^/(whip|whep|ws)/([^/]+)$")
_GUARDED = ("/whip/", "/whep/", "/ws/", "/api/")


def _token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if header and scheme.lower() == "bearer":
        return value.strip()
    return request.query.get("token", "")


@web.middleware
async def gate_middleware(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    if not request.path.startswith(_GUARDED):
        return await handler(request)
    token = _token(request)
    if not token:
        return await handler(request)
    try:
        claims = verify_token(request.app["secret"], token)
    except TokenError:
        return await handler(request)
    classroom = request.app["classroom"]
    match = _JOIN.match(request.path)
    joining = bool(match) and ((match.group(1) == "ws" and request.method == "GET") or request.method == "POST")
    if joining:
        what, room = match.group(1), match.group(2)
        revoked, banned = await classroom.state.revoked_or_banned(claims.jti, room, claims.name)
    else:
        revoked, banned = bool(claims.jti) and await classroom.state.is_revoked(claims.jti), False
    if revoked:
        raise HttpError(401, "unauthorized", "token revoked", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    if joining:
        reason = await classroom.admission_refusal(room, claims, what, banned=banned)
        if reason is not None:
            logger.info("room=%s %s %s refused: %s", room, what, claims.name, reason)
            raise HttpError(403, "forbidden", reason)
    return await handler(request)
