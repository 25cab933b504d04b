"""``cpldm`` command line: ``cpldm [--lake URI] [--endpoint-url URL] [--debug] <command> ...``.

Each stage module defines ``add_parser(subparsers)`` registering its command(s) with a ``func(args)``;
user errors (:class:`cpldm_core.errors.UserError`, schema errors, config ranges) and storage failures (endpoint
unreachable, no such bucket, access denied, a lake path that is a file) print one line naming the URI or key
and exit 2, also when they happen inside a Ray task; ``--debug`` shows the traceback instead. A command module
that fails to import is an error, never a missing command.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from cpldm_core.configuration import lake_name  # noqa: F401 -- argparse type= of the stages' name options
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
    "pipelines.vae_recon",
    "pipelines.profile",
    "pipelines.evaluate",
    "pipelines.gallery",
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
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's progress output and notices, Ray workers' logs and every stage's log lines")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        # a command module that is missing or fails to import is a broken install, never a silently absent command
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            raise CommandImportError(f"command module {name} fails to import ({type(exc).__name__}: {exc}); "
                                     "reinstall cpldm (pip install -e .) or fix the module") from exc
        module.add_parser(sub)
    return parser


class CommandImportError(RuntimeError):
    """A module of :data:`COMMAND_MODULES` could not be imported."""


#: Error codes of S3 responses that a user fixes (bucket name, credentials, permissions).
S3_USER_CODES = ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                 "InvalidBucketName", "ExpiredToken", "NoSuchKey", "403", "404")


def _causes(exc: BaseException):
    """``exc`` and what it wraps: ``__cause__``/``__context__`` chains and Ray's task errors (``.cause``)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(getattr(e, "cause", None), BaseException):
            # Ray's RayTaskError(X) also subclasses X, but its text is the worker's traceback: use X itself
            todo.insert(0, e.cause)
            continue
        yield e
        todo += [e.__cause__, e.__context__]


def failure_message(exc: BaseException, lake_uri: str = "") -> str | None:
    """One line for a failure the user can fix (bad input or config, storage unreachable, missing bucket,
    denied access, a lake path that is a file), else ``None`` (a bug: the traceback is shown).

    Looks through wrapped exceptions (a Ray task's error carries the worker's exception as ``cause``).
    """
    found = list(_causes(exc))
    for e in found:
        if isinstance(e, (UserError, SchemaError)):
            return str(e).splitlines()[0] if str(e) else type(e).__name__
    where = f" (lake {lake_uri})" if lake_uri else ""
    for e in found:
        name, module = type(e).__name__, type(e).__module__
        if module.startswith("botocore") and "Credentials" in name:
            return f"no S3 credentials{where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or use an instance role"
        if module.startswith(("botocore", "aiohttp", "urllib3")) and ("Connect" in name or "Endpoint" in name):
            return f"cannot reach the S3 endpoint{where}: {str(e).splitlines()[0]}; check --endpoint-url"
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", "")) if module.startswith("botocore") else ""
        if code in S3_USER_CODES:
            return f"S3 refused the request{where}: {code}: {str(e).splitlines()[0]}"
    for e in found:
        if isinstance(e, (ConnectionError, TimeoutError)):
            return f"cannot reach the storage{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if isinstance(e, (PermissionError, NotADirectoryError, IsADirectoryError, FileNotFoundError, FileExistsError)):
            target = e.filename or (str(e).splitlines() or [""])[0]
            return f"{e.strerror or type(e).__name__}: {target}{where}"
        if type(e).__name__ == "OSError" and ("AWS Error" in str(e) or "S3" in str(e)):
            return f"S3 access failed{where}: {str(e).splitlines()[0]}"
    return None


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
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
    except CommandImportError as exc:
        if "--debug" in argv:
            raise
        print(f"cpldm: error: {exc}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    if args.verbose or args.debug:
        from pipelines.progress import set_verbose
        set_verbose(True)  # an environment variable: Ray workers started later inherit it
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
    except KeyboardInterrupt:
        print(f"cpldm {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # the one error boundary: user-fixable failures are one line, bugs a traceback
        message = None if args.debug else failure_message(exc, getattr(args, "lake", ""))
        if message is None:
            raise
        print(f"cpldm {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
