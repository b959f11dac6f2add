"""The review page at `/`: plain HTML, CSS and JavaScript from service/web/static/, talking to
the same API as any client (/predict, /feedback, /memory, /metrics)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_URL = "/static"
STATIC_DIR = Path(__file__).parent / "static"

# The page loads nothing from another host, and this header makes the browser hold it to that;
# blob: is for pictures the page fetches with the token and shows.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'self'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def review_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)
