"""``safous-sidecar serve``: the server's command line (a contract: docs/platform/settings-and-lifecycle.md).

Every flag is generated from the Settings model, so flags, environment variables and the
documentation cannot drift apart.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Sequence

from pydantic import ValidationError

from . import __version__, logs
from .settings import Settings, shown_default


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safous-sidecar",
        description="Safous ZTNA webhook rules as an Envoy ext_authz (gRPC) authorization sidecar.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="run the ext_authz gRPC server",
        description="Run the ext_authz gRPC server. Every flag also reads SAFOUS_<FLAG> from the environment.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "SAFOUS_" + name.upper()
        # A list setting is a repeatable flag; given once or more, it replaces the variable's list.
        repeated = typing.get_origin(field.annotation) in (list, tuple)
        if field.annotation is bool:  # a switch: given means true
            serve.add_argument(flag, dest=name, default=None, action="store_const", const="true",
                               help=f"{field.description} [env {env}=true]".replace("%", "%%"))
            continue
        serve.add_argument(flag, dest=name, default=None, metavar=name.split("_")[-1].upper(),
                           action="append" if repeated else "store",
                           help=f"{field.description} [env {env}, default {shown_default(field.default)}]"
                           .replace("%", "%%"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            if error["loc"]:
                where = "--" + str(error["loc"][0]).replace("_", "-")
                print(f"safous-sidecar: {where}: {error['msg']}", file=sys.stderr)
            else:  # a check across settings: its message names the flags
                print(f"safous-sidecar: {error['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format, settings.log_level)
    for name, flag, address in settings.exposed_listeners():
        logging.getLogger("sidecar").warning("listening on the network without TLS (--insecure-listen)",
                                             extra={"listener": name, "flag": flag, "listen": address})
    from .server import run_loop, serve  # late: grpc is not needed for --help or errors
    from .workers import run_workers

    if settings.workers > 1:
        return run_workers(settings)
    try:
        return run_loop(settings, serve(settings))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
