"""What the supervisor hands the HTTP side: the file descriptors and the status board that the
forked gunicorn arbiter (and every worker it forks) builds its ShardClient from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from productd.actors.pool import PoolBoard
from productd.actors.status import StatusBoard


@dataclass
class Frontend:
    """What the HTTP side is handed in the forked arbiter process."""

    listener_fds: list[int]  # one per gunicorn worker, all bound to --bind with SO_REUSEPORT
    inbox_fds: list[int]
    bell_fds: list[int]
    board: StatusBoard
    pool: PoolBoard | None = None  # the image workers' board (/readyz, /metrics)
    images: Any = None  # productd.images.settings.ImageSettings: where the job file and objects are
