"""Errors as design.md says: ``text/plain`` reasons on WHIP/WHEP, JSON ``{error, detail}`` on the API."""

from __future__ import annotations

import json
import logging
from typing import Awaitable, Callable, Optional

from aiohttp import web

logger = logging.getLogger(__name__)


class HttpError(Exception):
    """Raise anywhere in a handler; the middleware turns it into the right response."""

    def __init__(self, status: int, error: str, detail: str = "", headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}


def _is_plain(request: web.Request) -> bool:
    return request.path.startswith(("/whip/", "/whep/"))


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except HttpError as exc:
        logger.info("%s %s -> %d %s %s", request.method, request.path, exc.status, exc.error, exc.detail)
        if _is_plain(request):
            text = exc.error + (f": {exc.detail}" if exc.detail else "") + "\n"
            return web.Response(status=exc.status, text=text, content_type="text/plain", headers=exc.headers)
        body = json.dumps({"error": exc.error, "detail": exc.detail})
        return web.Response(status=exc.status, text=body, content_type="application/json", headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status >= 400 and not _is_plain(request) and (request.path == "/api" or request.path.startswith("/api/")):
            body = json.dumps({"error": exc.reason, "detail": exc.text or ""})
            # keep aiohttp's headers (Allow on a 405), not its text/plain body headers
            headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
            return web.Response(status=exc.status, text=body, content_type="application/json", headers=headers)
        raise
