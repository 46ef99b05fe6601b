"""The tests' free ports under pytest-xdist: each worker hands out ports of its own, never one that is taken."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support import OwnPorts


def test_each_xdist_worker_has_ports_of_its_own_below_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    handed: list[set[int]] = []
    for worker in range(3):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{worker}")
        ports = OwnPorts()
        handed.append({ports.take(1) for _ in range(200)})
    assert all(len(ports) == 200 for ports in handed), "a worker handed out a port twice"
    assert not (handed[0] & handed[1] or handed[0] & handed[2] or handed[1] & handed[2])
    assert all(OwnPorts.LOWEST <= port < first_ephemeral for ports in handed for port in ports)


def test_ports_in_a_row_skip_a_taken_port() -> None:
    ports = OwnPorts()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports.take(1) + 1))  # the next port it would hand out
        taken.listen()
        first = ports.take(2)
        assert taken.getsockname()[1] not in (first, first + 1)
    for port in (first, first + 1):
        with socket.socket() as sock:
            sock.bind(("0.0.0.0", port))


def test_ports_in_a_row_at_the_end_of_the_slice_start_again_at_its_start(monkeypatch: pytest.MonkeyPatch) -> None:
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "1")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    last = first_ephemeral - OwnPorts.LOWEST - 1
    monkeypatch.setattr("tests.support.os.urandom", lambda n: last.to_bytes(n, "big"))  # starts at its last port
    first = OwnPorts().take(2)
    assert OwnPorts.LOWEST <= first <= first_ephemeral - 2, "ports handed out past the worker's slice"
