"""Console entry: flags -> Settings -> uvicorn (one process, asyncio)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from app import __version__
from app.config import Settings


def _env_names(name: str) -> str:
    if name == "region":
        return "METERING_REGION, AWS_REGION, AWS_DEFAULT_REGION"
    return f"METERING_{name.upper()}"


def build_parser() -> argparse.ArgumentParser:
    """A flag per setting, documented from the Settings fields themselves."""
    parser = argparse.ArgumentParser(
        prog="metering-sidecar",
        description="AWS Marketplace Metering as plain HTTP on localhost. Every flag "
        "overrides its environment variable, which overrides the default.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--version", action="version", version=f"metering-sidecar {__version__}")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = "none" if field.default is None else field.default
        if hasattr(default, "get_secret_value"):
            default = "***"
        help_text = f"{field.description} [env: {_env_names(name)}; default: {default}]"
        help_text = help_text.replace("%", "%%")
        kwargs: dict[str, Any] = {"help": help_text, "dest": name}
        annotation = field.annotation
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = typing.get_args(annotation)
        parser.add_argument(flag, **kwargs)
    return parser


def load_settings(argv: Sequence[str] | None = None) -> Settings:
    """Settings from flags, then the environment, then defaults; exit 2 on bad values."""
    parser = build_parser()
    overrides = vars(parser.parse_args(argv))
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            print(f"metering-sidecar: invalid setting {where}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def fleet_settings(argv: Sequence[str]) -> int:
    """``python -m app fleet-settings [--write] [flags]``: how the settings that shape grains
    (the sidecar's own flags and environment, as a replica would read them) compare with
    the fleet's in the shared store; with ``--write``, make them the fleet's.

    Exit status: 0 when they are the fleet's (or were just written), 1 when they differ
    and nothing was written, 2 when there is no shared store or no fleet settings yet.
    Replicas already running keep what they started with; each one started from now on
    must match what is written (docs/shared-store.md: changing them for the fleet).
    """
    write = "--write" in argv
    settings = load_settings([arg for arg in argv if arg != "--write"])
    if settings.queue_dsn is None:
        print("fleet-settings: needs the shared store (METERING_QUEUE_DSN_FILE)", file=sys.stderr)
        return 2
    # Imported here: the command needs psycopg and botocore, --help does not.
    import socket

    import psycopg

    from app.queue.fleet import differences, fleet_values, read_settings, write_settings

    connect: dict[str, Any] = {"connect_timeout": max(2, int(settings.queue_connect_timeout))}
    if settings.queue_iam_auth:
        from app.aws.credentials import resolve_from_chain
        from app.aws.rds_auth import RdsTokens, database_of

        resolved = resolve_from_chain()
        if resolved is None:
            print("fleet-settings: no AWS credentials for the RDS IAM token", file=sys.stderr)
            return 2
        database = database_of(
            settings.queue_dsn.get_secret_value(),
            region=settings.queue_iam_region,
            default_region=settings.region,
        )
        connect["password"] = RdsTokens(database, lambda: resolved.frozen)()
    ours = fleet_values(settings)

    dsn = settings.queue_dsn.get_secret_value()

    async def run() -> int:
        async with await psycopg.AsyncConnection.connect(dsn, **connect) as conn:
            cursor = await conn.execute("SELECT to_regclass('fleet_settings') IS NOT NULL")
            if not (await cursor.fetchone() or (False,))[0]:
                print(
                    "fleet-settings: the store has no fleet settings yet (no replica of this "
                    "version started on it): the first replica to start writes its own",
                    file=sys.stderr,
                )
                return 2
            fleet = await read_settings(conn)
            for name, value in ours.items():
                theirs = fleet[name].value if name in fleet else "-"
                print(f"METERING_{name.upper()}: here {value}, fleet {theirs}")
            found = differences(ours, fleet)
            if not found:
                print("fleet-settings: these are the fleet's settings")
                return 0
            if not write:
                print("fleet-settings: they differ (--write makes these the fleet's):")
                for difference in found:
                    print(f"  {difference}")
                return 1
            await write_settings(conn, ours, f"fleet-settings on {socket.gethostname()}")
            await conn.commit()
            print("fleet-settings: written; every replica started from now on must have these")
            return 0

    try:
        return asyncio.run(run())
    except psycopg.Error as exc:
        from app.runtime.redaction import redact

        print(f"fleet-settings: the shared store failed: {redact(str(exc))}", file=sys.stderr)
        return 2


# Modules a dependency imports only to offer what the sidecar never uses, each behind an
# ``except ImportError`` of its own: httpx's command-line client (``httpx._main``: click,
# rich and pygments where they are installed, as they are beside the test tools, not in
# the image) and pydantic's v1 compatibility package, which FastAPI imports only to ask
# of every route whether its models are v1 models (the sidecar has none). Marked as not
# importable in the sidecar's own process, they cost nothing: 4 to 5 MB of idle RSS and
# 90 modules fewer (``python -m benchmarks.footprint`` shows what each import costs).
UNUSED_MODULES = ("httpx._main", "pydantic.v1")


def skip_unused_modules() -> None:
    """Make ``UNUSED_MODULES`` unimportable in this process (before httpx and FastAPI
    are imported), so that their importers take their own fallback."""
    for name in UNUSED_MODULES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> None:
    """Start the sidecar (or, as ``python -m app fleet-settings``, compare or change the
    fleet's settings in the shared store)."""
    skip_unused_modules()
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["fleet-settings"]:
        raise SystemExit(fleet_settings(args[1:]))
    settings = load_settings(args)

    # Imported after parsing, so that --help stays fast.
    from app.api.ops_listener import create_ops_app
    from app.main import create_app
    from app.runtime.logs import configure_logging
    from app.server.listeners import run

    configure_logging(settings.log_level)
    app = create_app(settings)
    run(app, create_ops_app(app) if settings.ops_port else None, settings)


if __name__ == "__main__":
    main()
