"""One entry point: `python -m service {train,retrofit,serve,feedback export} ...`.

Every settings flag comes from one generator, `add_flags`, fed `Flag`s (name, type, default,
help): `dataclass_flags` makes them from a config dataclass's fields (TrainConfig,
ClassifierConfig, RoutingPolicy; each field's docstring is its --help), `settings_flags` from
the pydantic ServiceConfig's (each field's description; left unset, the environment decides).
No list of fields is kept here: a field added to a config is a flag.

`serve --workers N` resolves its settings once (environment, then flags) and hands them to
every server process as one JSON document (ServiceConfig.to_environment); each process builds
its app with uvicorn's factory, service.web.app:create_app_from_environment. The web stack is
imported only when `serve` runs, so training needs none of it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import os
import shutil
import sys
import textwrap
import types
import typing
from collections.abc import Iterable
from pathlib import Path

from .core.model import ClassifierConfig
from .core.routing import RoutingPolicy
from .web.settings import ServiceConfig, usable_cores


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag, --<name with dashes>, parsed into the namespace's `name`."""
    name: str
    annotation: typing.Any  # the field's type: bool, int, float, str, X | None, list[X], tuple[X, ...], Literal[...]
    default: typing.Any  # what argparse gives when the flag is absent
    help: str


def add_flags(parser: argparse.ArgumentParser, flags: Iterable[Flag]) -> None:
    """The one flag generator: a bool is --x / --no-x, a list or tuple takes any number of
    values, a Literal its choices; `X | None` parses as X."""
    for f in flags:
        base = f.annotation
        if typing.get_origin(base) in (typing.Union, types.UnionType):  # X | None
            base = next(a for a in typing.get_args(base) if a is not type(None))
        if typing.get_origin(base) is typing.Literal:
            parsing = dict(choices=list(typing.get_args(base)))
        elif base is bool:
            parsing = dict(action=argparse.BooleanOptionalAction)
        elif typing.get_origin(base) in (list, tuple):
            parsing = dict(nargs="*", type=typing.get_args(base)[0])
        else:
            parsing = dict(type=base)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default, help=f.help, **parsing)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal after it)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = str(b.value.value)
    return docs


def dataclass_flags(cls: type, skip: Iterable[str] = (), unset: str | None = None) -> list[Flag]:
    """A flag per field of a config dataclass, defaulting to the field's default; with `unset`,
    to None instead (the caller keeps what it has; `unset` says what in --help)."""
    docs, hints, skip = field_docs(cls), typing.get_type_hints(cls), set(skip)
    flags = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = default if unset is None else unset
        flags.append(Flag(f.name, hints[f.name], default if unset is None else None,
                          f"{docs.get(f.name, '')} (default: {shown})"))
    return flags


def settings_flags(cls) -> list[Flag]:
    """A flag per field of a pydantic-settings class; left unset (None), the environment decides."""
    return [Flag(name, f.annotation, None, f"{f.description} (env {name.upper()}, default: {f.default})")
            for name, f in cls.model_fields.items()]


def pick(cls: type, ns: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


# the routing settings `retrofit` may set on a trained model: all but the thresholds, which
# training chose (and retrofit chooses) on the validation split
CHOSEN_ON_VALIDATION = ("confidence_threshold", "ood_threshold")
RETROFIT_POLICY = [f.name for f in dataclasses.fields(RoutingPolicy) if f.name not in CHOSEN_ON_VALIDATION]


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


def build_parser() -> argparse.ArgumentParser:
    from .core.train import FROM_DATASET, TrainConfig

    parser = argparse.ArgumentParser(prog="python -m service", description="Memory-augmented image classifier.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a model and write it to the model store")
    add_flags(p_train, dataclass_flags(TrainConfig) + dataclass_flags(ClassifierConfig, skip=FROM_DATASET)
              + dataclass_flags(RoutingPolicy))
    p_train.add_argument("--feedback-db", default=None,
                         help="fold the examples users taught (not forgotten) into the training split: a feedback "
                              "store URL (postgresql://... or sqlite:///path/feedback.db); class names included")
    p_train.set_defaults(func=train)

    p_retrofit = sub.add_parser("retrofit", help="give a model trained before online learning's pieces existed "
                                                 "its replay features, taught-row settings and ood_score "
                                                 "calibration; saves a new version")
    p_retrofit.add_argument("--store", default="model_store", help="model store folder (default: model_store)")
    p_retrofit.add_argument("--name", required=True, help="model name in the store")
    p_retrofit.add_argument("--replay-per-class", type=int, default=100,
                            help="training images per class whose features the model keeps (default: 100)")
    p_retrofit.add_argument("--data-dir", default=None, help="where the data set is (as for train)")
    p_retrofit.add_argument("--novelty-shrink", type=float, default=None,
                            help="covariance shrinkage of the ood_score's Gaussians (chosen on validation: "
                                 f"bench/experiments/ood.py; default {TrainConfig.novelty_shrink}; with --engine "
                                 "the model's own)")
    p_retrofit.add_argument("--novelty-probe-weight", type=float, default=None,
                            help="weight of the backbone's probe in the ood_score (chosen on validation: "
                                 f"bench/experiments/ood.py; default {TrainConfig.novelty_probe_weight}; with --engine "
                                 "the model's own where it has one)")
    p_retrofit.add_argument("--engine", default=None, choices=["openvino-int8"],
                            help="instead: give the model a CPU inference engine (docs/engine.md): the backbone "
                                 "quantised to int8 (needs nncf: the `quantize` extra), the memory re-embedded, "
                                 "thresholds chosen again; refused (exit 3, model unchanged) when it loses more "
                                 "than 0.3 point of routed validation accuracy")
    p_retrofit.add_argument("--calibration", type=int, default=1024,
                            help="with --engine: training images (never validation or test) that calibrate int8 "
                                 "(default: 1024)")
    p_retrofit.add_argument("--seed", type=int, default=0,
                            help="with --engine: draws the calibration images and the memory's items (default: 0)")
    p_retrofit.add_argument("--choose-online", action="store_true",
                            help="choose the online-learning settings (taught_bias, taught_l2, new_class_threshold, "
                                 "taught_distance_weight) on the validation split as training does, over their flags")
    add_flags(p_retrofit, dataclass_flags(RoutingPolicy, skip=CHOSEN_ON_VALIDATION, unset="keep"))
    p_retrofit.set_defaults(func=retrofit)

    add_serve_parser(sub)

    p_fb = sub.add_parser("feedback", help="the feedback store: export what users taught")
    fb_sub = p_fb.add_subparsers(dest="feedback_command", required=True)
    p_export = fb_sub.add_parser("export", help="write the stored images (not forgotten) to OUT/train/<label>/<id>.<ext>, "
                                                "the layout --dataset imagefolder reads")
    p_export.add_argument("--feedback-db", required=True, help="postgresql://... or sqlite:///path/feedback.db")
    p_export.add_argument("--out", required=True, help="folder to write")
    p_export.set_defaults(func=export_feedback)
    return parser


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
    from .core.retrofit import NOVELTY_SHRINK, PROBE_WEIGHT, retrofit_model
    from .core.store import ModelStoreError

    policy = {f: getattr(ns, f) for f in RETROFIT_POLICY}
    if ns.engine is not None:
        return retrofit_with_engine(ns, policy)
    try:
        shrink = ns.novelty_shrink if ns.novelty_shrink is not None else NOVELTY_SHRINK
        weight = ns.novelty_probe_weight if ns.novelty_probe_weight is not None else PROBE_WEIGHT
        d = retrofit_model(ns.store, ns.name, ns.replay_per_class, ns.data_dir, policy, novelty_shrink=shrink,
                           choose_online=ns.choose_online, probe_weight=weight)
    except (ValueError, DatasetMissing, ModelStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved {d}")
    return 0


def retrofit_with_engine(ns: argparse.Namespace, policy: dict) -> int:
    """`retrofit --engine`: exit 0 saved, 2 bad input, 3 refused by the accuracy gate (nothing written)."""
    from .core.data import DatasetMissing
    from .core.engine import EngineUnavailable
    from .core.retrofit import EngineRefused, retrofit_engine
    from .core.store import ModelStoreError, read_manifest, served_version

    try:
        report = retrofit_engine(ns.store, ns.name, ns.engine, ns.calibration, ns.seed, ns.data_dir, policy,
                                 novelty_shrink=ns.novelty_shrink, choose_online=ns.choose_online,
                                 probe_weight=ns.novelty_probe_weight,
                                 log=lambda line: print(line, flush=True))
    except EngineRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, DatasetMissing, ModelStoreError, EngineUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = read_manifest(report.saved)
    print(f"saved {report.saved}: version {manifest['version']}; served as {served_version(manifest, ns.engine)} with "
          f"ENGINE={ns.engine} (the default, ENGINE=auto) and as {served_version(manifest)} with ENGINE=eager")
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


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model from the store over HTTP (environment variables of the "
                                     "same names, upper-cased, are the defaults)")
    workers = int(os.environ.get("WEB_CONCURRENCY") or usable_cores())
    add_flags(p, [
        Flag("host", str, "127.0.0.1", "address to bind (default: 127.0.0.1)"),
        Flag("port", int, 8000, "port (default: 8000)"),
        Flag("log_level", str, "info", "uvicorn log level (default: info)"),
        Flag("workers", int, workers, "server processes, each a full copy of the model kept consistent through the "
                                      "feedback store, sharing the cores (env WEB_CONCURRENCY, default: the cores "
                                      "this process may use)"),
        *settings_flags(ServiceConfig)])
    p.set_defaults(func=serve)


def serve(ns: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from .core.store import ModelStoreError, model_dir
    from .web.app import create_app
    from .web.workers import run_workers

    try:
        config = service_config(ns)
        model_dir(config.model_store, config.model_name)  # refuse a traversal before anything starts
    except (ValidationError, ModelStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ns.workers < 1:
        print("error: --workers must be >= 1", file=sys.stderr)
        return 2
    server = dict(log_level=ns.log_level, timeout_graceful_shutdown=30, timeout_keep_alive=5)
    if ns.workers == 1:
        uvicorn.run(create_app(config), host=ns.host, port=ns.port, **server)
        return 0
    prepare_worker_environment(config, ns.workers, ns.port)
    return run_workers(ns.workers, ns.host, ns.port, server)


def service_config(ns: argparse.Namespace) -> ServiceConfig:
    """The environment's settings, the flags given over them."""
    return ServiceConfig(**{f: getattr(ns, f) for f in ServiceConfig.model_fields if getattr(ns, f) is not None})


def prepare_worker_environment(config: ServiceConfig, workers: int, port: int) -> ServiceConfig:
    """Set up the environment `workers` server processes inherit; returns the settings they get.

    Each process takes its share of the cores instead of them all: OMP_NUM_THREADS (torch
    reads it when a process imports it, so it must be in the environment) and DECODE_THREADS,
    unless given. One /metrics for all processes: prometheus_client's multiprocess mode reads
    PROMETHEUS_MULTIPROC_DIR at import; this server's own folder, emptied first (an earlier
    run's values must not be summed in). The settings themselves go as one JSON document
    (ServiceConfig.to_environment), read by each process's factory (web/workers.py)."""
    share = max(1, usable_cores() // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(share))
    if config.decode_threads is None:  # images decoded at once: the cores, over all processes
        config = config.model_copy(update={"decode_threads": share})
    folder = Path(config.state_dir) / f"prometheus-{port}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder.resolve())
    config.to_environment()
    return config
