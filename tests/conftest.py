"""Fixtures that start the real service: one shared per test module, and a factory for tests that need their own."""

from __future__ import annotations

import signal

import pytest
from service import Productd, ServiceError


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A productd with 4 shards and 2 gunicorn workers, shared by the tests of one module.

    On teardown it must stop on SIGTERM with exit code 0 and leave no process behind.
    """
    svc = Productd(tmp_path_factory.mktemp("productd"), shards=4, workers=2)
    svc.start()
    try:
        yield svc
        code = svc.stop(signal.SIGTERM)
        if code != 0:
            raise ServiceError(f"shared service exited with {code} on SIGTERM\n{svc.log_tail()}")
        svc.assert_no_leftovers()
    finally:
        svc.kill()


@pytest.fixture
def start_service(tmp_path):
    """Factory: start_service(shards=.., workers=.., extra_args=[...], env={...}) -> a started Productd.

    Every instance it starts is killed (whole session, SIGKILL) when the test ends.
    """
    started: list[Productd] = []

    def factory(**opts) -> Productd:
        svc = Productd(tmp_path / f"svc{len(started)}", **opts)
        started.append(svc)
        return svc.start()

    yield factory
    for svc in started:
        svc.kill()
