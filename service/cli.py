"""One entry point: `python -m service {train,serve} ...`.

Flags are generated from the config dataclasses; each field's docstring is its --help.
The web stack is imported only when `serve` runs, so training needs none of it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from pathlib import Path

from .core.model import ClassifierConfig
from .core.routing import RoutingPolicy
from .web.settings import ServiceConfig, usable_cores


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal after it)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = str(b.value.value)
    return docs


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{docs.get(f.name, '')} (default: {default})"
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if base is bool:
            parser.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction,
                                help=help_text)
        elif typing.get_origin(hint) is list or typing.get_origin(base) is list:
            parser.add_argument(flag, dest=f.name, default=default, nargs="*", help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=default, type=base, help=help_text)


def pick(cls: type, ns: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


# the routing policy's online-learning settings, which `retrofit` may set on a trained model
ONLINE_POLICY = ("new_class_threshold", "class_balance", "taught_rows", "taught_bias", "correction_bias", "taught_l2")

# fields of ClassifierConfig that training takes from the data set
DERIVED = ("num_classes", "in_chans", "image_size", "memory_classes")


def main(argv: list[str] | None = None) -> int:
    from .core.train import TrainConfig

    parser = argparse.ArgumentParser(prog="python -m service", description="Memory-augmented image classifier.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a model and write it to the model store")
    add_dataclass_args(p_train, TrainConfig)
    add_dataclass_args(p_train, ClassifierConfig, skip=DERIVED)
    add_dataclass_args(p_train, RoutingPolicy)
    p_train.add_argument("--feedback-db", default=None,
                         help="fold the examples users taught (not forgotten) into the training split: a feedback "
                              "store URL (postgresql://... or sqlite:///path/feedback.db); class names included")
    p_train.set_defaults(func=train)

    p_retrofit = sub.add_parser("retrofit", help="give a model trained before online learning's pieces existed "
                                                 "its replay features and taught-row settings; saves a new version")
    p_retrofit.add_argument("--store", default="model_store", help="model store folder (default: model_store)")
    p_retrofit.add_argument("--name", required=True, help="model name in the store")
    p_retrofit.add_argument("--replay-per-class", type=int, default=100,
                            help="training images per class whose features the model keeps (default: 100)")
    p_retrofit.add_argument("--data-dir", default=None, help="where the data set is (as for train)")
    for f in ONLINE_POLICY:  # the confidence threshold stays as training chose it
        flag = "--" + f.replace("_", "-")
        kind = dict(action=argparse.BooleanOptionalAction) if f == "taught_rows" else dict(type=float)
        p_retrofit.add_argument(flag, dest=f, default=None, help=f"{field_docs(RoutingPolicy)[f]} (default: keep)",
                                **kind)
    p_retrofit.set_defaults(func=retrofit)

    add_serve_parser(sub)

    p_fb = sub.add_parser("feedback", help="the feedback store: export what users taught")
    fb_sub = p_fb.add_subparsers(dest="feedback_command", required=True)
    p_export = fb_sub.add_parser("export", help="write the stored images (not forgotten) to OUT/train/<label>/<id>.<ext>, "
                                                "the layout --dataset imagefolder reads")
    p_export.add_argument("--feedback-db", required=True, help="postgresql://... or sqlite:///path/feedback.db")
    p_export.add_argument("--out", required=True, help="folder to write")
    p_export.set_defaults(func=export_feedback)

    ns = parser.parse_args(argv)
    return ns.func(ns)


def train(ns: argparse.Namespace) -> int:
    from .core.data import DatasetMissing, load_dataset
    from .core.store import InputSpec
    from .core.train import TrainConfig, run_training

    try:
        tc, cc, policy = pick(TrainConfig, ns), pick(ClassifierConfig, ns), pick(RoutingPolicy, ns)
        ds, taught = None, None
        if ns.feedback_db:
            from .serving.export import taught_examples
            from .serving.feedback_store import open_store

            ds = load_dataset(tc.dataset, tc.data_dir, tc.download)
            store = open_store(ns.feedback_db, ".")
            try:
                taught = taught_examples(store, InputSpec(ds.image_size, ds.in_chans, [0.0], [1.0]))
            finally:
                store.close()
            print(f"folding {len(taught[1])} taught examples from the feedback store into training", flush=True)
        run = run_training
        if "TORCHELASTIC_ERROR_FILE" in os.environ:
            # under torchrun: a process's exception goes, with its traceback, into torchrun's
            # failure summary (the other processes are stopped and the run exits non-zero)
            from torch.distributed.elastic.multiprocessing.errors import record

            run = record(run_training)
        run(tc, cc, policy, ds=ds, taught=taught)
    except (ValueError, DatasetMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def retrofit(ns: argparse.Namespace) -> int:
    from .core.data import DatasetMissing
    from .core.store import ModelStoreError
    from .core.train import retrofit_model

    policy = {f: getattr(ns, f) for f in ONLINE_POLICY}
    try:
        d = retrofit_model(ns.store, ns.name, ns.replay_per_class, ns.data_dir, policy)
    except (ValueError, DatasetMissing, ModelStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved {d}")
    return 0


def export_feedback(ns: argparse.Namespace) -> int:
    from .serving.export import export_imagefolder
    from .serving.feedback_store import open_store

    store = open_store(ns.feedback_db, ".")
    try:
        n = export_imagefolder(store, ns.out)
    finally:
        store.close()
    print(f"exported {n} examples to {ns.out}/train/<label>/")
    return 0


def add_settings_args(parser: argparse.ArgumentParser, cls) -> None:
    """Flags from a pydantic-settings class; left unset (None), the environment decides."""
    for name, f in cls.model_fields.items():
        base = f.annotation
        if typing.get_origin(base) in (typing.Union, types.UnionType):  # X | None
            base = next(a for a in typing.get_args(base) if a is not type(None))
        if typing.get_origin(base) is typing.Literal:
            kind = dict(choices=list(typing.get_args(base)))
        elif base is bool:
            kind = dict(action=argparse.BooleanOptionalAction)
        else:
            kind = dict(type=base)
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                            help=f"{f.description} (env {name.upper()}, default: {f.default})", **kind)


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model from the store over HTTP (environment variables of the "
                                     "same names, upper-cased, are the defaults)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")
    p.add_argument("--workers", type=int, default=int(os.environ.get("WEB_CONCURRENCY") or usable_cores()),
                   help="server processes, each a full copy of the model kept consistent through the feedback "
                        "store, sharing the cores (env WEB_CONCURRENCY, default: the cores this process may use)")
    add_settings_args(p, ServiceConfig)
    p.set_defaults(func=serve)


def serve(ns: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from .core.store import ModelStoreError, model_dir
    from .web.app import create_app

    overrides = {f: getattr(ns, f) for f in ServiceConfig.model_fields if getattr(ns, f) is not None}
    try:
        config = ServiceConfig(**overrides)
        model_dir(config.model_store, config.model_name)  # refuse a traversal before anything starts
    except (ValidationError, ModelStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ns.workers < 1:
        print("error: --workers must be >= 1", file=sys.stderr)
        return 2
    if ns.workers == 1:
        uvicorn.run(create_app(config), host=ns.host, port=ns.port, log_level=ns.log_level,
                    timeout_graceful_shutdown=30, timeout_keep_alive=5)
        return 0
    # several processes: each builds the app from the environment (the flags given here are
    # passed down as their variables) and shares the cores instead of each taking them all
    for name in overrides:
        os.environ[name.upper()] = str(overrides[name])
    share = str(max(1, usable_cores() // ns.workers))  # each process's part of the cores
    os.environ.setdefault("OMP_NUM_THREADS", share)
    os.environ.setdefault("DECODE_THREADS", share)  # images decoded at once: the cores, over all processes
    # folders the processes share, this server's own, emptied first (an earlier run's values
    # must not be summed in): one /metrics for all processes (prometheus_client's
    # multiprocess mode), and their connection counts (BalanceConnections)
    for env, name in (("PROMETHEUS_MULTIPROC_DIR", "prometheus"), ("WORKER_COUNTS_DIR", "connections")):
        folder = Path(config.state_dir) / f"{name}-{ns.port}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        os.environ[env] = str(folder.resolve())
    uvicorn.run("service.web.app:app", host=ns.host, port=ns.port, log_level=ns.log_level, workers=ns.workers,
                timeout_graceful_shutdown=30, timeout_keep_alive=5)
    return 0
