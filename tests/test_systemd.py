"""systemd integration: the notify handshake against a fake NOTIFY_SOCKET, and the unit file."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest
import requests
from service import REPO_ROOT, Productd

UNIT = REPO_ROOT / "deploy" / "productd.service"
DEADLINE = 30.0  # seconds; only so that a hang fails
UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


class FakeSystemd:
    """An AF_UNIX datagram socket like systemd's notify socket, recording each sender's pid."""

    def __init__(self, directory) -> None:
        path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if len(path) < 100:
            self.sock.bind(path)
            self.address = path
        else:  # too long for sun_path: the abstract namespace, which NOTIFY_SOCKET spells with "@"
            name = f"productd-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[int, str]] = []  # (sender pid, datagram)

    def receive(self, timeout: float) -> tuple[int, str] | None:
        self.sock.settimeout(timeout)
        try:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
        except (TimeoutError, BlockingIOError):
            return None
        pid = -1
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = UCRED.unpack(cdata[: UCRED.size])[0]
        message = (pid, data.decode())
        self.messages.append(message)
        return message

    def wait_for(self, assignment: str, deadline: float = DEADLINE) -> tuple[int, str]:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            got = self.receive(max(0.01, end - time.monotonic()))
            if got and assignment in got[1].split("\n"):
                return got
        raise AssertionError(f"no {assignment} within {deadline}s; got {self.messages}")

    def drain(self, quiet: float) -> None:
        """Take what has arrived, until nothing comes for `quiet` seconds."""
        while self.receive(quiet) is not None:
            pass

    def close(self) -> None:
        self.sock.close()


def lines_of(messages: list[tuple[int, str]]) -> list[str]:
    return [line for _, m in messages for line in m.split("\n") if line]


def test_notify_handshake(tmp_path):
    fake = FakeSystemd(tmp_path)
    svc = Productd(tmp_path / "svc", shards=4, workers=2, env={"NOTIFY_SOCKET": fake.address})
    started: list[BaseException | None] = []

    def start() -> None:
        try:
            svc.start()
            started.append(None)
        except BaseException as exc:  # reported by the main thread
            started.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    try:
        fake.wait_for("READY=1")
        # READY=1 only once every shard has loaded and the socket listens: /readyz answers 200
        # at once, without a retry (the connection waits in the listen backlog for a worker).
        r = requests.get(svc.url + "/readyz", timeout=(DEADLINE, DEADLINE))
        assert r.status_code == 200, r.text
        assert all(s["ready"] for s in r.json()["shards"])
        starter.join(DEADLINE * 2)
        assert not starter.is_alive(), "the service did not start"
        assert started == [None], started
        # gunicorn's arbiter would send its own READY=1 once its workers boot: they have by now.
        fake.drain(quiet=1.0)
        ready_count = lines_of(fake.messages).count("READY=1")
        assert svc.stop(signal.SIGTERM) == 0, svc.log_tail()
        fake.wait_for("STOPPING=1")
        fake.drain(quiet=0.2)
    finally:
        starter.join(DEADLINE * 2)
        svc.kill()
        fake.close()

    lines = lines_of(fake.messages)
    assert ready_count == 1, fake.messages
    assert lines.count("READY=1") == 1, fake.messages
    assert lines.count("STOPPING=1") == 1, fake.messages
    assert lines.index("READY=1") < lines.index("STOPPING=1")
    statuses = [line for line in lines if line.startswith("STATUS=")]
    assert statuses and all(len(s) > len("STATUS=") for s in statuses), fake.messages
    # Only the supervisor (the process systemd would start) ever spoke; never gunicorn's arbiter.
    senders = {pid for pid, _ in fake.messages}
    assert senders == {svc.pid}, f"datagrams from {senders}, supervisor is {svc.pid}: {fake.messages}"
    assert not any("unicorn" in m for _, m in fake.messages), fake.messages
    for line in lines:
        assert line.split("=", 1)[0] in {"READY", "STATUS", "STOPPING", "EXTEND_TIMEOUT_USEC"}, line


def test_no_notify_socket_no_trouble(start_service):
    """Without NOTIFY_SOCKET the service starts and stops as usual (nothing to talk to)."""
    svc = start_service(shards=1, workers=1, env={"NOTIFY_SOCKET": ""})
    assert svc.stop() == 0, svc.log_tail()


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_declares_notify_and_hardening():
    svc = _unit()["Service"]
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    assert svc["ExecStart"].split()[1:] == ["serve"]
    assert svc.get("User") and svc["User"] != "root"
    assert svc["StateDirectory"] == "productd"
    assert svc["Restart"] in ("on-failure", "always")
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert svc[key] == "yes", key
    assert svc["ProtectSystem"] == "strict"
    assert "EnvironmentFile" in svc
    assert svc["LoadCredential"].startswith("token:")


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit file was not verified")
    # verify checks that ExecStart's binary exists: point it at a dummy in tmp_path.
    dummy = tmp_path / "productd"
    dummy.write_text("#!/bin/sh\nexit 0\n")
    dummy.chmod(0o755)
    text = UNIT.read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    binary = exec_start.split("=", 1)[1].split()[0]
    unit = tmp_path / "productd.service"
    unit.write_text(text.replace(f"ExecStart={binary}", f"ExecStart={dummy}"))
    run = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert not [line for line in output.splitlines() if "productd.service" in line], output
