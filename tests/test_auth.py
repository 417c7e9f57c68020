"""--auth-token-file: writes need `Authorization: Bearer <token>`, reads only with --auth-reads,
and the token never reaches the log."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import requests
from service import TIMEOUT, assert_problem, free_port, service_env, uid

OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/openapi.json")


def _token_file(directory, token: str):
    path = directory / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def assert_unauthorized(r: requests.Response) -> None:
    assert_problem(r, 401)
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), r.headers


@pytest.fixture
def token() -> str:
    return "tok-" + uuid.uuid4().hex + uuid.uuid4().hex


def test_writes_need_the_token_reads_stay_open(start_service, tmp_path, token):
    path = _token_file(tmp_path, token)
    svc = start_service(shards=2, workers=2, extra_args=["--auth-token-file", str(path), "--access-log"])
    pid = uid("auth")
    event = {"product_id": pid, "price": 3}

    assert_unauthorized(svc.post(event))
    assert_unauthorized(svc.post(event, headers={"Authorization": f"Bearer {token[:-1]}x"}))
    assert_unauthorized(svc.post(event, headers={"Authorization": f"Bearer {token}x"}))
    assert_unauthorized(svc.post(event, headers={"Authorization": f"Basic {token}"}))
    assert_unauthorized(svc.post(event, headers={"Authorization": "Bearer"}))
    assert_unauthorized(svc.post_raw(b"x", "text/plain"))  # refused before the body is looked at
    assert svc.get(pid).status_code == 404  # nothing of the refused writes was applied

    r = svc.post(event, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 202, r.text
    assert svc.post({"product_id": pid, "stock": 4}, headers={"Authorization": f"bearer {token}"}).status_code == 202
    assert svc.product(pid)["price"] == 3  # read without a token
    assert svc.product(pid)["stock"] == 4
    for path_ in OPEN_PATHS:
        assert requests.get(svc.url + path_, timeout=TIMEOUT).status_code == 200, path_

    assert svc.stop() == 0
    log = svc.log_text()
    assert "401" in log  # the refusals were logged ...
    assert token not in log  # ... and the token never was
    assert token[:-1] not in log


def test_auth_reads_protects_product_reads(start_service, tmp_path, token):
    path = _token_file(tmp_path, token)
    svc = start_service(shards=1, workers=1, extra_args=["--auth-token-file", str(path), "--auth-reads"])
    pid = uid("reads")
    assert svc.post({"product_id": pid, "price": 1}, headers={"Authorization": f"Bearer {token}"}).status_code == 202
    assert_unauthorized(svc.get(pid))
    assert_unauthorized(svc.get(pid, headers={"Authorization": "Bearer wrong"}))
    r = svc.get(pid, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["price"] == 1
    for path_ in OPEN_PATHS:
        assert requests.get(svc.url + path_, timeout=TIMEOUT).status_code == 200, path_
    assert svc.stop() == 0
    assert token not in svc.log_text()


def _serve_with_token_file(tmp_path, token_path: str) -> subprocess.CompletedProcess:
    env = service_env("none")
    argv = [sys.executable, "-m", "productd", "serve", "--bind", f"127.0.0.1:{free_port()}",
            "--shards", "1", "--workers", "1", "--auth-token-file", token_path]
    # A service that starts anyway would run until the deadline: the timeout makes that a failure.
    return subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("kind", ["missing", "directory", "empty"])
def test_unreadable_token_file_stops_start_with_clear_message(tmp_path, kind):
    if kind == "missing":
        path = tmp_path / "no-such-token"
    elif kind == "directory":
        path = tmp_path / "token-dir"
        path.mkdir()
    else:
        path = tmp_path / "empty-token"
        path.write_text("\n")
    run = _serve_with_token_file(tmp_path, str(path))
    assert run.returncode != 0, run.stderr
    assert "auth-token-file" in run.stderr and str(path) in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
