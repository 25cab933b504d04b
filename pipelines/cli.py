"""``cpldm`` command line: ``cpldm [--lake URI] [--endpoint-url URL] [--debug] <command> ...``.

Each stage module defines ``add_parser(subparsers)`` registering its command(s) with a ``func(args)``;
user errors (:class:`cpldm_core.errors.UserError`, schema errors) print one line and exit 2, with the
traceback only under ``--debug``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys

from cpldm_core.errors import UserError
from storage_schemas import SchemaError

#: Stage modules, in pipeline order. Each registers its own subcommands.
COMMAND_MODULES = (
    "pipelines.lake_commands",
    "pipelines.sql",
    "pipelines.simulate",
    "pipelines.catalog",
    "pipelines.fit_vae",
    "pipelines.ingest",
    "pipelines.embed",
    "pipelines.train",
    "pipelines.generate",
    "pipelines.profile",
    "pipelines.evaluate",
    "pipelines.demo",
    "pipelines.cluster_local",
    "pipelines.cost",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpldm", description=__doc__.split("\n")[0])
    parser.add_argument("--lake", default=os.environ.get("CPLDM_LAKE", "./lake"),
                        help="lake URI: a local directory or s3://bucket/prefix (default: $CPLDM_LAKE or ./lake)")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3 endpoint for s3:// lakes (default: $AWS_ENDPOINT_URL)")
    parser.add_argument("--ray-address", default=None,
                        help="join this Ray cluster (default: $RAY_ADDRESS, else an in-process local Ray)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        # modules are listed ahead of the stages that provide them; a missing one simply has no command yet
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).add_parser(sub)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser, presets, config_class: type, default: str = "demo",
                         preset_help: str | None = None) -> None:
    """The three arguments every stage takes, parsed into ``args.preset``, ``args.config`` and ``args.set``.

    ``--preset NAME`` (one of ``presets``), ``--config FILE`` (YAML of ``config_class`` keys) and ``--set KEY=VALUE``
    (repeatable; nested keys with dots). The stage applies them in that order (:func:`config_from_args`), then its
    own dedicated flags.
    """
    parser.add_argument("--preset", default=default, choices=sorted(presets),
                        help=preset_help or f"config preset (default: {default})")
    parser.add_argument("--config", default=None, metavar="FILE", help=f"YAML file of {config_class.__name__} keys")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a {config_class.__name__} key (repeatable, e.g. --set a.b=1)")


def config_from_args(config_class: type, presets, args, extra: list[str] | None = None):
    """``config_class`` from ``args.preset`` (a key of ``presets``), then ``args.config``, then ``args.set``, then
    ``extra`` ``KEY=VALUE`` overrides (the stage's dedicated flags)."""
    from cpldm_core.configuration import load_config

    return load_config(config_class, args.config, [*args.set, *(extra or [])], base=presets[args.preset])


def lake_from_args(args):
    from pipelines.storage import Lake
    return Lake(args.lake, endpoint_url=args.endpoint_url)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address
    try:
        result = args.func(args)
    except (UserError, SchemaError) as exc:
        if args.debug:
            raise
        print(f"cpldm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cpldm {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
