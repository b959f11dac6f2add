"""One entry point: `python -m service {train,serve} ...`.

Flags are generated from the config dataclasses; each field's docstring is its --help.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import typing

from .model import ClassifierConfig


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


# fields of ClassifierConfig that training takes from the data set
DERIVED = ("num_classes", "in_chans", "image_size", "memory_classes")


def main(argv: list[str] | None = None) -> int:
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="python -m service", description="Memory-augmented image classifier.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a model and write it to the model store")
    add_dataclass_args(p_train, TrainConfig)
    add_dataclass_args(p_train, ClassifierConfig, skip=DERIVED)

    try:
        from .serve_cli import add_serve_parser
    except ImportError:  # the web stack is optional for training
        add_serve_parser = None
    if add_serve_parser is not None:
        add_serve_parser(sub)

    ns = parser.parse_args(argv)
    if ns.command == "train":
        from .data import DatasetMissing
        from .train import run_training

        try:
            tc, cc = pick(TrainConfig, ns), pick(ClassifierConfig, ns)
            run_training(tc, cc)
        except (ValueError, DatasetMissing) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    return ns.func(ns)
