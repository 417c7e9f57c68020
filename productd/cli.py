"""The `productd` command. Every option of `serve` can also come from PRODUCTD_<OPTION>."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields

from productd import __version__, logs
from productd.config import ENV_PREFIX, OPTIONS, Settings

log = logging.getLogger("productd")
TRUE = ("1", "true", "yes", "on")  # a flag's environment variable turns it on with any of these


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from productd.config.OPTIONS."""
    parser = argparse.ArgumentParser(prog="productd", description="Live product state, sharded over processes.")
    parser.add_argument("--version", action="version", version=f"productd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the service",
        description="Run the service: a supervisor, its shard processes and a gunicorn server. "
        f"Each option can also be set as {ENV_PREFIX}<OPTION> in the environment, "
        f"for example {ENV_PREFIX}SHARDS=8; the command line wins.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for option in OPTIONS:
        if not option.flag:
            serve.add_argument(
                f"--{option.name}",
                dest=option.dest,
                type=option.parse,
                choices=option.choices,
                default=option.default,
                help=f"{option.help} [env {option.env}]",
            )
    for option in OPTIONS:  # after the others, so that --help lists the flags last
        if option.flag:
            serve.add_argument(f"--{option.name}", action="store_true", help=f"{option.help} [env {option.env}=1]")
    # The cluster schema's command lives with the cluster (productd.cluster.migrate); main() hands it its arguments.
    commands.add_parser("migrate", add_help=False, help="create or upgrade a cluster's PostgreSQL schema")
    return parser


def parse_settings(argv: list[str] | None = None, environ=os.environ) -> Settings:
    parser = build_parser()
    args_in = list(sys.argv[1:] if argv is None else argv)
    # Environment values go through the same parsing as the command line, ahead of it, so the
    # command line wins and a bad value in the environment gets the same clear message.
    env_args = []
    for option in OPTIONS:
        if not option.flag:
            value = environ.get(option.env)
            if value is not None and value != "":
                env_args += [f"--{option.name}", value]
    for option in OPTIONS:
        if option.flag and environ.get(option.env, "").lower() in TRUE:
            env_args.append(f"--{option.name}")
    if args_in and args_in[0] == "serve":
        args_in = ["serve", *env_args, *args_in[1:]]
    args = parser.parse_args(args_in)
    values = {f.name: getattr(args, f.name) for f in fields(Settings) if hasattr(args, f.name)}
    settings = Settings(**values)
    if settings.image_lease <= settings.image_total_timeout:
        # A lease that runs out while its download is still allowed to go on hands the job to a
        # second worker: the same image fetched twice, and the first worker's result refused.
        parser.error(f"--image-lease {settings.image_lease} must exceed --image-total-timeout "
                     f"{settings.image_total_timeout} (one download) plus a render")
    if settings.image_backoff_base > settings.image_backoff_max:
        parser.error(f"--image-backoff-base {settings.image_backoff_base} is more than --image-backoff-max "
                     f"{settings.image_backoff_max}")
    return settings


def read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"productd: cannot read --auth-token-file {path}: {exc}") from None
    if not token or any(c.isspace() for c in token):
        raise SystemExit(f"productd: --auth-token-file {path} must hold one token without spaces")
    return token


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["migrate"]:
        from productd.cluster.migrate import main as migrate

        return migrate(args_in[1:])
    settings = parse_settings(argv)
    logs.setup(settings.log_level, settings.log_format)
    if settings.gunicorn_config and not os.path.isfile(settings.gunicorn_config):
        raise SystemExit(f"productd: --gunicorn-config {settings.gunicorn_config}: no such file")
    if settings.auth_token_file:
        settings.auth_token = read_token(settings.auth_token_file)
        log.info("POST /events requires a bearer token%s", " and so do reads" if settings.auth_reads else "")
    # Imported here so that `productd --help` stays fast.
    from productd.actors.supervisor import StartupError, Supervisor
    from productd.http.server import serve

    supervisor = Supervisor(settings, lambda frontend: serve(settings, frontend))
    try:
        return supervisor.run()
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
