"""`python -m service serve`: the web service under uvicorn (flags mirror the environment)."""

from __future__ import annotations

import argparse
import logging
import sys

from .settings import ServiceConfig


def add_serve_parser(sub) -> None:
    from .cli import add_dataclass_args

    p = sub.add_parser("serve", help="serve a model from the store over HTTP (environment variables of the "
                                     "same names, upper-cased, are the defaults)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")
    add_dataclass_args(p, ServiceConfig)
    for action in p._actions:  # flags left unset fall back to the environment
        if action.dest in {f for f in ServiceConfig.__dataclass_fields__}:
            action.default = None
    p.set_defaults(func=serve)


def serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .store import ModelStoreError, model_dir

    overrides = {f: getattr(ns, f) for f in ServiceConfig.__dataclass_fields__}
    try:
        config = ServiceConfig.from_env(**overrides)
        model_dir(config.model_store, config.model_name)  # refuse a traversal before anything starts
    except (ValueError, ModelStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(config), host=ns.host, port=ns.port, log_level=ns.log_level,
                timeout_graceful_shutdown=30, timeout_keep_alive=5)
    return 0
