"""/docs (Swagger UI) and /redoc (ReDoc) served wholly by this app, so they work with no
network: FastAPI's defaults load both from a CDN. The files come from the fastapi-offline
package (a PyPI dependency, installed with the service), never copied into the repository."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

ASSETS_URL = "/docs-assets"
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
_missing = [f for f in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
            if not (ASSETS_DIR / f).is_file()]
if _missing:  # a changed package layout should fail at start, not as a blank /docs page
    raise ImportError(f"fastapi-offline lacks {_missing} in {ASSETS_DIR}")

# ReDoc's menu shows its maker's logo from their CDN (and drops it when it fails to load): the
# browser is told to fetch pictures from this host only
NO_REMOTE_IMAGES = {"Content-Security-Policy": "img-src 'self' data: blob:"}

router = APIRouter(include_in_schema=False)


def _urls(request: Request) -> tuple[str, str]:
    # behind a proxy that mounts the app under a prefix, every URL needs that prefix
    root = request.scope.get("root_path", "")
    return root + request.app.openapi_url, root + ASSETS_URL


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    openapi, assets = _urls(request)
    page = get_swagger_ui_html(openapi_url=openapi, title=f"{request.app.title} - Swagger UI",
                               swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                               swagger_css_url=f"{assets}/swagger-ui.css",
                               swagger_favicon_url=f"{assets}/favicon.png",
                               # no badge from the public validator service: nothing leaves this host
                               swagger_ui_parameters={"validatorUrl": None})
    page.headers.update(NO_REMOTE_IMAGES)
    return page


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    openapi, assets = _urls(request)
    page = get_redoc_html(openapi_url=openapi, title=f"{request.app.title} - ReDoc",
                          redoc_js_url=f"{assets}/redoc.standalone.js", redoc_favicon_url=f"{assets}/favicon.png",
                          with_google_fonts=False)
    page.headers.update(NO_REMOTE_IMAGES)
    return page
