"""The `productd` command. Every option of `serve` can also come from PRODUCTD_<OPTION>."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields

from productd import __version__, logs
from productd.config import Settings

ENV_PREFIX = "PRODUCTD_"
log = logging.getLogger("productd")


def _positive_int(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def _seconds_within(accept, rule: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not accept(value):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"{value} must be {rule}")
        return value

    return parse


_seconds = _seconds_within(lambda v: 0 < v < 3600, "more than 0 and less than 3600 seconds")
_delay = _seconds_within(lambda v: 0 <= v <= 60, "0 to 60 seconds")


# (option, type, help): defaults come from Settings, overridable by the environment.
OPTIONS = (
    ("bind", str, "HOST:PORT to listen on"),
    ("shards", _positive_int(1, 64),
     "shard processes that own the products (1..64; default: the count recorded in the data dir, else 4)"),
    ("workers", _positive_int(1, 256), "gunicorn worker processes, one event loop each (default: 1 per CPU)"),
    ("enqueue-timeout", _seconds, "seconds a write waits for room in a full inbox before it gets 503"),
    ("read-timeout", _seconds, "seconds a read waits for its shard before it gets 504"),
    ("max-body-bytes", _positive_int(1, 1 << 30), "largest request body; larger gets 413"),
    ("max-events", _positive_int(1, 1_000_000), "most events in one request; more gets 413"),
    ("inbox-bytes", _positive_int(4096, 1 << 30), "capacity of each shard's inbox pipe in bytes"),
    ("graceful-timeout", _seconds, "seconds in-flight requests get to finish on stop"),
    ("header-timeout", _seconds,
     "seconds a client has to send a request's line and headers (and a new connection its first request); "
     "slower gets 408 or is closed"),
    ("body-timeout", _seconds, "seconds a client has to send a request's body after its headers; slower gets 408"),
    ("max-connections", _positive_int(1, 1_000_000),
     "connections each worker holds; past it the one idle the longest is closed (503 if none is idle)"),
    ("gunicorn-config", str, "a gunicorn config file for every other gunicorn setting"),
    ("log-level", str, "debug, info, warning or error"),
    ("log-format", str, "json (one object per line) or text"),
    ("data-dir", str, "directory of the shards' SQLite files (not used with --durability none)"),
    ("durability", str, "none: memory only; batch: commit every --commit-interval; sync: 202 after commit"),
    ("commit-interval", _seconds, "batch durability: longest time between commits"),
    ("apply-delay", _delay,
     "seconds a shard lets single events gather before applying them; a read or a stop wakes it "
     "at once (0: apply each as it comes; not used with --durability sync)"),
    ("auth-token-file", str, "file holding the bearer token that POST /events requires (default: no auth)"),
)
FLAGS = (
    ("reshard", "move every product to the --shards count when it differs from the data dir's"),
    ("access-log", "log every request (requests answered 4xx or 5xx are always logged)"),
    ("auth-reads", "with --auth-token-file, GET /products/{id} needs the token too"),
)
CHOICES = {
    "log-level": ("debug", "info", "warning", "error"),
    "log-format": ("json", "text"),
    "durability": ("none", "batch", "sync"),
}


def build_parser() -> argparse.ArgumentParser:
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
    defaults = Settings()
    for name, kind, help_text in OPTIONS:
        dest = name.replace("-", "_")
        env = ENV_PREFIX + dest.upper()
        serve.add_argument(
            f"--{name}",
            dest=dest,
            type=kind,
            choices=CHOICES.get(name),
            default=getattr(defaults, dest),
            help=f"{help_text} [env {env}]",
        )
    for name, help_text in FLAGS:
        env = ENV_PREFIX + name.replace("-", "_").upper()
        serve.add_argument(f"--{name}", action="store_true", help=f"{help_text} [env {env}=1]")
    return parser


def parse_settings(argv: list[str] | None = None, environ=os.environ) -> Settings:
    parser = build_parser()
    args_in = list(sys.argv[1:] if argv is None else argv)
    # Environment values go through the same parsing as the command line, ahead of it, so the
    # command line wins and a bad value in the environment gets the same clear message.
    env_args = []
    for name, _, _ in OPTIONS:
        value = environ.get(ENV_PREFIX + name.replace("-", "_").upper())
        if value is not None and value != "":
            env_args += [f"--{name}", value]
    for name, _ in FLAGS:
        value = environ.get(ENV_PREFIX + name.replace("-", "_").upper(), "").lower()
        if value in ("1", "true", "yes", "on"):
            env_args.append(f"--{name}")
    if args_in and args_in[0] == "serve":
        args_in = ["serve", *env_args, *args_in[1:]]
    args = parser.parse_args(args_in)
    values = {f.name: getattr(args, f.name) for f in fields(Settings) if hasattr(args, f.name)}
    settings = Settings(**values)
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
