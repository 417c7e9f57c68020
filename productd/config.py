"""Settings of one productd instance, with their defaults. Filled in by the command line."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class Settings:
    bind: str = "127.0.0.1:8080"
    shards: int | None = None  # None: the count recorded in the data dir, else DEFAULT_SHARDS
    # Chosen by measurement on 2 cores (README, "Choosing the defaults"): one event loop per CPU.
    workers: int = os.cpu_count() or 1
    enqueue_timeout: float = 0.5
    read_timeout: float = 2.0
    max_body_bytes: int = 4 * 1024 * 1024
    max_events: int = 10_000
    inbox_bytes: int = 1024 * 1024
    gunicorn_config: str | None = None
    graceful_timeout: float = 30.0
    header_timeout: float = 10.0  # from a request's first byte (or an idle connection's last) to its blank line
    body_timeout: float = 30.0  # from the end of a request's head to the end of its body
    max_connections: int = 1000  # per worker; past it the connection idle the longest is closed
    log_level: str = "info"
    log_format: str = "json"
    data_dir: str = "./data"
    durability: str = "batch"
    commit_interval: float = 0.05
    # A shard that received only events sleeps this long before reading more, so one wake-up
    # applies many; a reader rings its doorbell (README, "Apply delay"). Measured in issue 4.
    apply_delay: float = 0.01
    reshard: bool = False
    access_log: bool = False
    auth_token_file: str | None = None
    auth_reads: bool = False
    auth_token: str | None = field(default=None, repr=False)  # from auth_token_file; never logged


DEFAULT_SHARDS = 4
