"""A real KMS stand-in for tests and benchmarks: moto's server plus a counting proxy.

``MotoServer`` runs ``moto_server`` in a subprocess on 127.0.0.1 (real HTTP,
real AES-GCM wrapping with the encryption context as AAD).  ``KmsProxy`` sits
in front of it and

- records every KMS request and answer (operation, JSON bodies, HTTP status),
  so tests count calls per operation and read the encryption context sent on
  the wire;
- optionally delays every call (benchmarks: a fixed KMS latency);
- injects faults moto never produces (disabled key, throttling, 5xx), each
  answered as KMS would, with the AWS error code in ``__type``;
- can be stopped and started again on the same port (an outage: connections
  refused), or made to hang (accept and never answer: read timeouts).

Used by the KMS tests (tests/conftest.py's ``moto`` and ``proxy`` fixtures, the
tests/mount KMS modules) and by scripts/bench-kms; it lives here because nothing in
scripts/ imports from tests/.  Standard library only, except boto3 in
``MotoServer.client`` (run it with the checkout's .venv).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REGION = "us-east-1"
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
}


def aws_environment(root: Path) -> dict[str, str]:
    """Dummy credentials and a hermetic AWS config (no ~/.aws, no instance metadata)."""
    return {
        **DUMMY_CREDENTIALS,
        "AWS_CONFIG_FILE": str(root / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": REGION,
        "NO_PROXY": "127.0.0.1,localhost",
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class MotoServer:
    """``moto_server`` in a subprocess.  Attributes: port, url, log_path."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        binary = Path(sys.executable).parent / "moto_server"
        command = (
            [str(binary)] if binary.exists() else [shutil.which("moto_server") or "moto_server"]
        )
        with open(log_path, "wb") as log:
            self._process = subprocess.Popen(
                [*command, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_port(self.port)
        except BaseException:
            self.stop()
            raise

    def client(self) -> Any:
        """A boto3 KMS client talking to moto directly (not counted by any proxy)."""
        import boto3

        return boto3.client(
            "kms",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def create_key(self, alias: str | None = None) -> str:
        """A new symmetric key; returns its ARN."""
        client = self.client()
        try:
            arn: str = client.create_key(Description="kmsfs test")["KeyMetadata"]["Arn"]
            if alias:
                client.create_alias(AliasName=alias, TargetKeyId=arn)
        finally:
            client.close()
        return arn

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


@dataclass
class Call:
    """One request through the proxy.  ``faulted`` if the proxy answered it itself."""

    operation: str
    request: dict[str, Any]
    status: int
    response: dict[str, Any]
    faulted: bool = False

    @property
    def context(self) -> dict[str, str]:
        context: dict[str, str] = self.request.get("EncryptionContext", {})
        return context

    def blob(self, field: str, where: str = "response") -> bytes:
        body = self.response if where == "response" else self.request
        return base64.b64decode(body[field])


@dataclass
class Fault:
    """An answer the proxy gives instead of forwarding: an AWS error code and HTTP status."""

    code: str
    status: int = 400
    message: str = "injected by the test proxy"


class KmsProxy:
    """A counting, delaying, fault-injecting HTTP proxy in front of a KMS endpoint.

    Attributes: upstream, port, url, delay (seconds added to every call), calls,
    before (called with the operation name and request body before a call is
    forwarded, in the proxy's thread: a test acts while the client waits).
    """

    def __init__(self, upstream: str, delay: float = 0.0) -> None:
        self.upstream = upstream
        self.delay = delay
        self.calls: list[Call] = []
        self.before: Callable[[str, dict[str, Any]], None] | None = None
        self.port = 0
        self.url = ""
        self._faults: dict[str, list[tuple[Fault, int | None]]] = {}
        self._lock = threading.Lock()
        self._hang = threading.Event()
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self._local = threading.local()
        self.start()

    # -- control -------------------------------------------------------------

    def start(self) -> None:
        """Listen (again) on the same port."""
        proxy = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        class Handler(_Handler):
            pass

        Handler.proxy = proxy
        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """An outage: stop listening and cut every open connection (connections refused)."""
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections.clear()

    def hang(self) -> None:
        """Accept requests and never answer them (until ``unhang`` or ``stop``)."""
        self._release.clear()
        self._hang.set()

    def unhang(self) -> None:
        self._hang.clear()
        self._release.set()

    def inject(self, operation: str, fault: Fault, times: int | None = None) -> None:
        """Answer the next *times* calls of *operation* (all, if None) with *fault*."""
        with self._lock:
            self._faults.setdefault(operation, []).append((fault, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset_calls(self) -> None:
        with self._lock:
            self.calls.clear()

    def ops(self, operation: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.operation == operation]

    def count(self, operation: str) -> int:
        return len(self.ops(operation))

    def close(self) -> None:
        self.stop()

    # -- used by the handler -------------------------------------------------

    def _take_fault(self, operation: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(operation, [])
            if not queue:
                return None
            fault, times = queue[0]
            if times is not None:
                if times <= 1:
                    queue.pop(0)
                else:
                    queue[0] = (fault, times - 1)
            return fault

    def _forward(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, str]:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        for attempt in (1, 2):
            if conn is None:
                host = self.upstream.split("//", 1)[1]
                conn = http.client.HTTPConnection(host, timeout=30)
                self._local.conn = conn
            try:
                conn.request("POST", "/", body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                return response.status, data, response.getheader("Content-Type", "")
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = None
                self._local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: KmsProxy

    def setup(self) -> None:
        super().setup()
        with self.proxy._lock:
            self.proxy._connections.add(self.connection)

    def finish(self) -> None:
        with self.proxy._lock:
            self.proxy._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        proxy = self.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        operation = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            request = {}
        if proxy._hang.is_set():
            proxy._release.wait(60)
            self.close_connection = True
            return
        if proxy.delay:
            time.sleep(proxy.delay)
        if proxy.before is not None:
            proxy.before(operation, request)
        fault = proxy._take_fault(operation)
        if fault is not None:
            status = fault.status
            data = json.dumps({"__type": fault.code, "message": fault.message}).encode()
            content_type = "application/x-amz-json-1.1"
        else:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            try:
                status, data, content_type = proxy._forward(body, headers)
            except (OSError, http.client.HTTPException):
                self.close_connection = True
                return
        try:
            response = json.loads(data or b"{}")
        except ValueError:
            response = {}
        with proxy._lock:
            proxy.calls.append(Call(operation, request, status, response, fault is not None))
        self.send_response(status)
        self.send_header("Content-Type", content_type or "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def kms_stack(root: Path, delay: float = 0.0) -> Iterator[tuple[MotoServer, KmsProxy]]:
    """Start moto and a proxy in front of it; stop both when the generator closes."""
    os.makedirs(root, exist_ok=True)
    moto = MotoServer(root / "moto.log")
    proxy = KmsProxy(moto.url, delay)
    try:
        yield moto, proxy
    finally:
        proxy.close()
        moto.stop()
