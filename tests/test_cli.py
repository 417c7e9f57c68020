"""`productd serve` options: defaults, PRODUCTD_* environment, precedence and refusals (pure logic).

That the running service honours them is covered by the tests that start it with options.
"""

from __future__ import annotations

import os
import socket

import pytest

from productd.actors.listeners import ListenError, parse_bind
from productd.cli import parse_settings
from productd.config import Settings


def test_defaults_are_the_documented_ones():
    s = parse_settings(["serve"], environ={})
    assert s.bind == "127.0.0.1:8080"
    assert s.shards is None  # the data dir's count, else 4
    assert s.workers == (os.cpu_count() or 1)  # one event loop per CPU
    assert (s.header_timeout, s.body_timeout, s.max_connections) == (10.0, 30.0, 1000)
    assert (s.durability, s.data_dir, s.commit_interval) == ("batch", "./data", 0.05)
    assert s.apply_delay == 0.01
    assert (s.enqueue_timeout, s.read_timeout) == (0.5, 2.0)
    assert (s.max_body_bytes, s.max_events, s.inbox_bytes) == (4 * 1024 * 1024, 10_000, 1024 * 1024)
    assert not (s.reshard or s.access_log or s.auth_reads)
    assert s == Settings(**{**vars(Settings()), "workers": s.workers})


def test_environment_sets_options_and_the_command_line_wins():
    env = {
        "PRODUCTD_SHARDS": "7", "PRODUCTD_DURABILITY": "sync", "PRODUCTD_READ_TIMEOUT": "1.5",
        "PRODUCTD_ACCESS_LOG": "1", "PRODUCTD_RESHARD": "no", "PRODUCTD_BIND": "127.0.0.1:9000",
    }
    s = parse_settings(["serve", "--shards", "3"], environ=env)
    assert s.shards == 3  # command line over environment
    assert (s.durability, s.read_timeout, s.bind) == ("sync", 1.5, "127.0.0.1:9000")
    assert s.access_log is True and s.reshard is False


def test_image_options_reach_the_image_settings():
    from productd.images.settings import ImageSettings, from_settings

    env = {"PRODUCTD_IMAGE_WORKERS": "3", "PRODUCTD_IMAGE_ALLOW_PRIVATE": "1", "PRODUCTD_IMAGE_QUALITY": "60"}
    s = parse_settings(["serve", "--data-dir", "/srv/d", "--image-allow-networks", "10.1.2.3/24, fd00::/8",
                        "--image-lease", "300", "--image-quality", "70"], environ=env)
    images = from_settings(s)
    assert (images.data_dir, images.workers, images.allow_private, images.quality) == ("/srv/d", 3, True, 70)
    assert images.allow_networks == ("10.1.2.0/24", "fd00::/8") and images.lease == 300.0
    assert images.images_dir == "/srv/d/images" and images.jobs_path == "/srv/d/images/jobs.sqlite3"
    assert from_settings(s, data_dir="/tmp/x").jobs_path == "/tmp/x/images/jobs.sqlite3"
    # With no --image-* option given, the service runs the pipeline's own defaults.
    assert from_settings(parse_settings(["serve"], environ={})) == ImageSettings()


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["serve", "--shards", "0"], {}, "outside 1..64"),
        (["serve", "--shards", "65"], {}, "outside 1..64"),
        (["serve"], {"PRODUCTD_SHARDS": "x"}, "is not an integer"),
        (["serve", "--durability", "fast"], {}, "invalid choice"),
        (["serve", "--read-timeout", "0"], {}, "more than 0"),
        (["serve", "--enqueue-timeout", "nan"], {}, "more than 0"),
        (["serve", "--inbox-bytes", "100"], {}, "outside 4096"),
        (["serve", "--apply-delay", "-0.1"], {}, "0 to 60 seconds"),
        (["serve"], {"PRODUCTD_APPLY_DELAY": "61"}, "0 to 60 seconds"),
        (["serve", "--apply-delay", "nan"], {}, "0 to 60 seconds"),
        (["serve", "--image-workers", "-1"], {}, "outside 0..64"),
        (["serve", "--image-quality", "101"], {}, "outside 1..100"),
        (["serve", "--image-allow-networks", "10.0.0.0/8,intranet"], {}, "'intranet' is not a network"),
        (["serve"], {"PRODUCTD_IMAGE_ALLOW_NETWORKS": "300.1.2.3/32"}, "is not a network"),
        (["serve", "--image-lease", "30"], {}, "--image-lease 30.0 must exceed --image-total-timeout 30.0"),
        (["serve", "--image-total-timeout", "200"], {}, "must exceed --image-total-timeout 200.0"),
        (["serve", "--image-backoff-base", "700"], {}, "more than --image-backoff-max 600.0"),
    ],
)
def test_bad_values_are_refused_with_the_reason(capsys, argv, env, message):
    with pytest.raises(SystemExit) as info:
        parse_settings(argv, environ=env)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "bind, family, address",
    [
        ("127.0.0.1:8080", socket.AF_INET, ("127.0.0.1", 8080)),
        ("0.0.0.0:80", socket.AF_INET, ("0.0.0.0", 80)),
        ("[::1]:8080", socket.AF_INET6, ("::1", 8080)),
        ("localhost:0", socket.AF_INET, ("localhost", 0)),
    ],
)
def test_bind_addresses(bind, family, address):
    assert parse_bind(bind) == (family, address)


@pytest.mark.parametrize("bind", ["abc", "127.0.0.1", ":8080", "127.0.0.1:http", "127.0.0.1:65536", "h:-1"])
def test_bad_bind_addresses(bind):
    with pytest.raises(ListenError, match="expected HOST:PORT"):
        parse_bind(bind)
