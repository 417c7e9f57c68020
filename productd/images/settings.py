"""The image pipeline's settings: one field per `--image-*` option of productd.config.

The options are declared once, in productd.config.OPTIONS (which drives the command line, the
README table and deploy/productd.env); `from_settings` maps a productd `Settings` onto these
fields by name (`image_<field>`). The defaults here are for code that builds an ImageSettings
without a command line (`python -m productd.images.worker`, the tests); tests/test_config.py
holds them equal to the options' defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from productd.images import fetch, jobs, render


@dataclass(frozen=True)
class ImageSettings:
    """Field `x_y` is the proposed option `--image-x-y` (`PRODUCTD_IMAGE_X_Y`), `data_dir` is `--data-dir`."""

    data_dir: str = "./data"
    workers: int = 1
    max_bytes: int = 20 * 1024 * 1024
    connect_timeout: float = 5.0
    total_timeout: float = 30.0
    max_redirects: int = 5
    allow_private: bool = False
    allow_networks: tuple = ()  # CIDR,CIDR on the command line
    max_pixels: int = render.MAX_PIXELS
    max_side: int = render.MAX_SIDE
    quality: int = render.QUALITY
    max_attempts: int = 5
    backoff_base: float = 2.0
    backoff_max: float = 600.0
    lease: float = 120.0  # longer than one job can take (timeout + render)
    idle_wait: float = 0.5  # seconds between looks at the queue when it is empty
    nice: int = 10  # added to the niceness of each worker, which also runs SCHED_BATCH

    def limits(self) -> fetch.Limits:
        return fetch.Limits(
            max_bytes=self.max_bytes, connect_timeout=self.connect_timeout, total_timeout=self.total_timeout,
            max_redirects=self.max_redirects,
            policy=fetch.AddressPolicy(self.allow_private, tuple(self.allow_networks)),
        )

    def backoff(self) -> jobs.Backoff:
        return jobs.Backoff(base=self.backoff_base, cap=self.backoff_max)

    @property
    def images_dir(self) -> str:
        return os.path.join(self.data_dir, "images")

    @property
    def jobs_path(self) -> str:
        return str(jobs.path_in(self.data_dir))


def from_settings(settings, data_dir: str | None = None) -> ImageSettings:
    """The image settings of a productd `Settings`: `image_<name>` fields where it has them.

    `data_dir` replaces `settings.data_dir` (the supervisor's temporary directory with
    `--durability none`, where the shards have no data dir but the pipeline needs one)."""
    values = {"data_dir": settings.data_dir if data_dir is None else data_dir}
    for f in fields(ImageSettings):
        name = "image_" + f.name
        if f.name != "data_dir" and hasattr(settings, name):
            values[f.name] = getattr(settings, name)
    networks = values.get("allow_networks")
    if networks is None:  # the option's default: none
        values["allow_networks"] = ()
    elif isinstance(networks, str):
        values["allow_networks"] = tuple(n.strip() for n in networks.split(",") if n.strip())
    else:
        values["allow_networks"] = tuple(networks)
    return ImageSettings(**values)
