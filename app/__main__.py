"""Console entry: flags -> Settings -> uvicorn (one process, asyncio)."""

from __future__ import annotations

import argparse
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


def main(argv: Sequence[str] | None = None) -> None:
    """Start the sidecar."""
    settings = load_settings(argv)

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
