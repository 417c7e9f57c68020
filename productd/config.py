"""Every option of `productd serve`, declared once, and the `Settings` generated from them.

As gunicorn's config.py drives its command line from one Setting per option, each `Option`
below holds everything about one option: its name, parser and range, default, environment
variable, help and, where productd passes it on, the gunicorn setting it becomes. cli.py builds
the argparse parser from OPTIONS, http/server.py hands the gunicorn ones on, and every limit
that follows from an option (the largest shard count, the default most events per request)
reads it here. tests/test_config.py holds the README's option table and deploy/productd.env
to this list.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field, make_dataclass
from typing import Any

ENV_PREFIX = "PRODUCTD_"
DEFAULT_SHARDS = 4  # with no --shards and no data dir that records a count


class Integer:
    """Parses an integer within low..high, both included."""

    type = int

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not self.low <= value <= self.high:
            raise argparse.ArgumentTypeError(f"{value} is outside {self.low}..{self.high}")
        return value


class Seconds:
    """Parses a number of seconds between low and high: both included when `closed`, else neither."""

    type = float

    def __init__(self, low: float, high: float, closed: bool) -> None:
        self.low, self.high, self.closed = low, high, closed
        self.rule = f"{low} to {high} seconds" if closed else f"more than {low} and less than {high} seconds"

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if self.closed:
            accepted = self.low <= value <= self.high
        else:
            accepted = self.low < value < self.high
        if not accepted:  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"{value} must be {self.rule}")
        return value


class Networks:
    """Parses a comma-separated list of CIDR networks (an empty list: none) into a tuple of strings."""

    type = tuple

    def __call__(self, text: str) -> tuple[str, ...]:
        import ipaddress  # here, not at the top: `productd --help` stays fast

        networks = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            try:
                networks.append(str(ipaddress.ip_network(part, strict=False)))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{part!r} is not a network (CIDR, like 10.1.2.0/24)") from None
        return tuple(networks)


TIMEOUT = Seconds(0, 3600, closed=False)
SHARDS = Integer(1, 64)  # the largest count also sizes http/stats.py's per-shard counters


@dataclass(frozen=True)
class Option:
    """One option of `productd serve`: --<name> on the command line, PRODUCTD_<NAME> in the environment."""

    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] | None = str  # None: a flag, off unless given
    choices: tuple[str, ...] | None = None
    # What the README and deploy/productd.env say the default is, when it is not a plain value.
    default_doc: str | None = None
    # The gunicorn setting productd sets from this option, whatever --gunicorn-config says.
    gunicorn: str | None = None
    to_gunicorn: Callable[[Any], Any] = lambda value: value  # noqa: E731 - the value as it is

    @property
    def flag(self) -> bool:
        return self.parse is None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    @property
    def type(self) -> type:
        return bool if self.flag else getattr(self.parse, "type", self.parse)


# In the order `productd serve --help` lists them (flags after the options with a value).
OPTIONS: tuple[Option, ...] = (
    Option("bind", "127.0.0.1:8080", "HOST:PORT to listen on"),
    Option("shards", None,
           f"shard processes that own the products ({SHARDS.low}..{SHARDS.high}; default: the count "
           f"recorded in the data dir, else {DEFAULT_SHARDS})",
           parse=SHARDS, default_doc=f"the count recorded in the data dir, else {DEFAULT_SHARDS}"),
    # Chosen by measurement on 2 cores (bench/README.md, "Worker count"): one event loop per CPU.
    Option("workers", os.cpu_count() or 1, "gunicorn worker processes, one event loop each (default: 1 per CPU)",
           parse=Integer(1, 256), default_doc="1 per CPU", gunicorn="workers"),
    Option("enqueue-timeout", 0.5, "seconds a write waits for room in a full inbox before it gets 503",
           parse=TIMEOUT),
    Option("read-timeout", 2.0, "seconds a read waits for its shard before it gets 504", parse=TIMEOUT),
    Option("max-body-bytes", 4 * 1024 * 1024, "largest request body; larger gets 413", parse=Integer(1, 1 << 30)),
    Option("max-events", 10_000, "most events in one request; more gets 413", parse=Integer(1, 1_000_000)),
    # At least one frame (protocol.PIPE_BUF; config stays free of imports so --help is fast).
    Option("inbox-bytes", 1024 * 1024, "capacity of each shard's inbox pipe in bytes",
           parse=Integer(4096, 1 << 30)),
    # gunicorn takes whole seconds, and 0 would mean no grace at all.
    Option("graceful-timeout", 30.0, "seconds in-flight requests get to finish on stop", parse=TIMEOUT,
           gunicorn="graceful_timeout", to_gunicorn=lambda seconds: max(1, round(seconds))),
    Option("header-timeout", 10.0,
           "seconds a client has to send a request's line and headers (and a new connection its first request); "
           "slower gets 408 or is closed", parse=TIMEOUT),
    Option("body-timeout", 30.0, "seconds a client has to send a request's body after its headers; slower gets 408",
           parse=TIMEOUT),
    Option("max-connections", 1000,
           "connections each worker holds; past it the one idle the longest is closed (503 if none is idle)",
           parse=Integer(1, 1_000_000)),
    Option("gunicorn-config", None, "a gunicorn config file for every other gunicorn setting"),
    Option("log-level", "info", "debug, info, warning or error",
           choices=("debug", "info", "warning", "error"), gunicorn="loglevel"),
    Option("log-format", "json", "json (one object per line) or text", choices=("json", "text")),
    Option("data-dir", "./data", "directory of the shards' SQLite files (not used with --durability none)"),
    Option("durability", "batch",
           "none: memory only; batch: commit every --commit-interval; sync: 202 after commit",
           choices=("none", "batch", "sync")),
    Option("commit-interval", 0.05, "batch durability: longest time between commits", parse=TIMEOUT),
    # A shard that received only events sleeps this long before reading more, so one wake-up
    # applies many; a reader rings its doorbell (docs/design.md, "Apply delay"). Measured in issue 4.
    Option("apply-delay", 0.01,
           "seconds a shard lets single events gather before applying them; a read or a stop wakes it "
           "at once (0: apply each as it comes; not used with --durability sync)",
           parse=Seconds(0, 60, closed=True)),
    # The change feed (GET /changes, docs/feed.md): each shard keeps its last N changes (on disk
    # with durability on); a cursor older than them gets 410, a subscriber more than N/2 behind
    # is cut off.
    Option("change-history", 100_000,
           "changes each shard keeps for GET /changes; older cursors get 410, a subscriber more than half "
           "of it behind is cut off", parse=Integer(100, 100_000_000)),
    # The image pipeline (docs/images.md, "Configuration"). Each --image-<x-y> is the field
    # x_y of productd.images.settings.ImageSettings, whose defaults tests/test_config.py holds
    # equal to these. A default of 1 worker until the bench measures the front end's loss with
    # the pool busy; 0 queues jobs that wait for a start with workers.
    Option("image-workers", 1, "image worker processes (0: none, jobs wait)", parse=Integer(0, 64)),
    Option("image-max-bytes", 20 * 1024 * 1024, "largest image download in bytes; larger fails as too-large",
           parse=Integer(1024, 1 << 30)),
    Option("image-connect-timeout", 5.0, "seconds per connection attempt of an image download", parse=TIMEOUT),
    Option("image-total-timeout", 30.0, "seconds for a whole image download, redirects included", parse=TIMEOUT),
    Option("image-max-redirects", 5, "redirects an image download follows", parse=Integer(0, 20)),
    Option("image-allow-networks", None,
           "comma-separated CIDR networks images may be fetched from although not public (default: none)",
           parse=Networks()),
    Option("image-max-pixels", 40_000_000, "larger images (width x height) are refused as bombs",
           parse=Integer(1, 1_000_000_000)),
    Option("image-max-side", 1024, "longest side of the stored rendition in pixels", parse=Integer(16, 16384)),
    Option("image-quality", 80, "WebP quality of the rendition", parse=Integer(1, 100)),
    Option("image-max-attempts", 5, "attempts of an image job before it is dead", parse=Integer(1, 100)),
    Option("image-backoff-base", 2.0, "seconds before the first retry of an image job; doubles each attempt",
           parse=TIMEOUT),
    Option("image-backoff-max", 600.0, "longest retry delay of an image job in seconds", parse=TIMEOUT),
    # The lease must outlast one attempt (a download's total time plus a render): cli.py checks it.
    Option("image-lease", 120.0,
           "seconds an image worker holds its job; a worker killed mid-job leaves it to be taken again after "
           "this (must exceed --image-total-timeout)", parse=TIMEOUT),
    Option("image-idle-wait", 0.5, "seconds between an idle image worker's looks at the queue",
           parse=Seconds(0, 60, closed=False)),
    Option("image-nice", 10, "niceness added to each image worker (which also runs SCHED_BATCH)",
           parse=Integer(0, 19)),
    # The multi-host mode (docs/cluster.md): shard queues on RabbitMQ, shard state in PostgreSQL.
    # Without --broker, productd is the single-host service above and ignores the rest of these.
    Option("broker", None, "amqp://user:password@host:port/vhost of the RabbitMQ that carries the shard queues "
           "(default: none, one host with its own inboxes)"),
    Option("database", None, "postgresql://... URL of the cluster's database (needed with --broker; create it "
           "with productd migrate)"),
    Option("cluster", "default", "the cluster's name: its queues are productd.NAME.shard.K (as given to "
           "productd migrate)"),
    Option("role", "both", "with --broker: frontend (HTTP only), owner (shard owners only) or both",
           choices=("both", "frontend", "owner")),
    Option("owner-hosts", 1, "with --broker: how many owner hosts share the shards", parse=Integer(1, 64)),
    Option("owner-index", 0, "with --broker: this owner host's place among them, 0..owner-hosts-1; it prefers "
           "the shards whose number modulo --owner-hosts is --owner-index", parse=Integer(0, 63)),
    Option("heartbeat", 5.0, "with --broker: AMQP heartbeat seconds; the broker gives a silent host's shards "
           "to another after about two of them", parse=Seconds(1, 600, closed=True)),
    Option("queue-length", 100_000, "with --broker: most messages waiting in a shard queue; more gets 503",
           parse=Integer(1, 100_000_000)),
    Option("prefetch", 2000, "with --broker: most messages an owner holds unacknowledged (applied, not "
           "yet committed)", parse=Integer(1, 1_000_000)),
    Option("auth-token-file", None, "file holding the bearer token that POST /events requires (default: no auth)"),
    Option("reshard", False, "move every product to the --shards count when it differs from the data dir's",
           parse=None),
    Option("access-log", False, "log every request (requests answered 4xx or 5xx are always logged)", parse=None),
    Option("auth-reads", False, "with --auth-token-file, GET /products/{id} needs the token too", parse=None),
    Option("image-allow-private", False,
           "fetch images from loopback, private and link-local addresses too (tests, closed networks)", parse=None),
)
OPTION = {option.name: option for option in OPTIONS}


def _settings_field(option: Option) -> tuple[str, Any, Any]:
    kind = option.type if option.default is not None else option.type | None
    return option.dest, kind, field(default=option.default)


# The settings of one productd instance: a field per option, with its default, plus the token
# read from --auth-token-file (never logged). Generated, so a new option is one Option above.
Settings = make_dataclass(
    "Settings",
    [*(_settings_field(option) for option in OPTIONS), ("auth_token", str | None, field(default=None, repr=False))],
    namespace={"__doc__": "Settings of one productd instance: one field per Option, filled in by the command line."},
)
Settings.__module__ = __name__
