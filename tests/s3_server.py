"""A real S3-protocol server for the tests and benchmarks, with a cloud's latency and faults.

- ``moto_server(tmp)``: moto's server mode (``python -m moto.server``, what s3fs's own test
  suite runs against) as a process on 127.0.0.1, stopped by PID;
- ``fault_proxy(upstream, latency_ms=...)``: this file run as a process, an HTTP proxy in front
  of it that adds a round trip's latency to every request and injects what moto does not
  produce: 5xx answers, throttling (503 ``SlowDown``), access denied, and a connection cut off
  mid-object (headers and part of the body, then a closed socket). Faults are rules set at run
  time (``proxy.set_faults([...])``); ``proxy.stats()`` counts what it served (in all and by
  method; the paths PUT, and those GET with their Range header, in order) and injected.

``s3_env(url)`` is the environment a client needs (endpoint, dummy credentials, region): the
standard AWS variables, as a user sets them for a real bucket.

    with moto_server(tmp) as moto, fault_proxy(moto.url, latency_ms=20) as proxy:
        env = s3_env(proxy.url); make_bucket(env, "data")
        proxy.set_faults([{"method": "GET", "key": "shard-000001", "action": "slowdown",
                           "times": 3}])

Run as a script: ``python tests/s3_server.py proxy --upstream URL [--latency-ms N]`` prints
``port N`` once it listens.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CONTROL = "/__proxy__"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class Server:
    url: str
    proc: subprocess.Popen


@contextlib.contextmanager
def moto_server(tmp: str | os.PathLike):
    """moto's S3 server on a free port of 127.0.0.1 (its log in ``tmp/moto.log``)."""
    port = free_port()
    log = open(Path(tmp) / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_listening(port, proc)
        yield Server(f"http://127.0.0.1:{port}", proc)
    finally:
        stop(proc)
        log.close()


def s3_env(endpoint: str, **extra) -> dict[str, str]:
    """The environment of a client of ``endpoint``: the standard AWS variables (dummy
    credentials: moto accepts any), few retries' worth of waiting for the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing-key-id",
               AWS_SECRET_ACCESS_KEY="testing-secret-key", AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/nonexistent",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
    env.update(extra)
    return env


@contextlib.contextmanager
def using_env(env: dict[str, str]):
    """``env`` as this process's environment (boto3 reads it) for the block."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        from pipelines import object_store
        object_store._clients.clear()      # a client keeps the endpoint it was made with
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        object_store._clients.clear()


def make_bucket(env: dict[str, str], name: str) -> None:
    import boto3
    boto3.session.Session().client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)


# ---------------------------------------------------------------- the proxy (client side)
@dataclass
class Proxy:
    url: str
    proc: subprocess.Popen

    def _call(self, path: str, body: object | None = None):
        data = None if body is None else json.dumps(body).encode()
        with urllib.request.urlopen(urllib.request.Request(
                self.url + CONTROL + path, data=data, method="POST" if data else "GET"),
                timeout=10) as r:
            return json.loads(r.read() or b"null")

    def set_faults(self, rules: list[dict]) -> None:
        """Rules, tried in order on each request: ``method`` (GET, PUT, ...; any if absent),
        ``key`` (a regex searched in the path ``/bucket/key``), ``action`` (``500``,
        ``slowdown``, ``denied``, ``notimplemented`` (501), ``cut``: half the body, then the
        connection closed; ``hold``: the request waits ``ms`` milliseconds before it is
        forwarded, counted in ``stats()["held"]`` meanwhile: an upload in flight that a test can
        kill the writer in), ``times`` (injections before the rule is spent; absent: forever)."""
        self._call("/faults", rules)

    def set_latency(self, ms: float) -> None:
        self._call("/latency", {"ms": ms})

    def stats(self) -> dict:
        return self._call("/stats")


@contextlib.contextmanager
def fault_proxy(upstream: str, latency_ms: float = 0.0, tmp: str | os.PathLike | None = None):
    log = open(Path(tmp) / "proxy.log", "wb") if tmp else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, __file__, "proxy", "--upstream", upstream,
                             "--latency-ms", str(latency_ms)], stdout=subprocess.PIPE,
                            stderr=log, start_new_session=True, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError(f"the fault proxy did not start (said {line!r})")
        yield Proxy(f"http://127.0.0.1:{int(line.split()[1])}", proc)
    finally:
        stop(proc)
        if tmp:
            log.close()


# ---------------------------------------------------------------- the proxy (server side)
_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "denied": (403, "AccessDenied", "Access Denied"),
    "notimplemented": (501, "NotImplemented", "A header you provided implies functionality "
                                              "that is not implemented"),
}


class ProxyState:
    def __init__(self, upstream: str, latency_ms: float):
        m = re.match(r"^http://([^:/]+):(\d+)", upstream)
        self.host, self.port = m.group(1), int(m.group(2))
        self.latency_s = latency_ms / 1000
        self.rules: list[dict] = []
        self.lock = threading.Lock()
        self.stats = {"requests": 0, "injected": {}, "methods": {}, "puts": [], "gets": [],
                      "held": 0}
        self.local = threading.local()

    def fault_for(self, method: str, path: str, byte_range: str | None = None) -> dict | None:
        with self.lock:
            self.stats["requests"] += 1
            self.stats["methods"][method] = self.stats["methods"].get(method, 0) + 1
            if method == "PUT":
                self.stats["puts"].append(path.split("?")[0])
            if method == "GET":
                self.stats["gets"].append([path.split("?")[0], byte_range])
            for rule in self.rules:
                if rule.get("method", method) != method:
                    continue
                if not re.search(rule.get("key", ""), path):
                    continue
                if rule.get("times") is not None:
                    if rule["times"] <= 0:
                        continue
                    rule["times"] -= 1
                action = rule["action"]
                self.stats["injected"][action] = self.stats["injected"].get(action, 0) + 1
                return rule
        return None

    def hold(self, ms: float) -> None:
        with self.lock:
            self.stats["held"] += 1
        try:
            time.sleep(ms / 1000)
        finally:
            with self.lock:
                self.stats["held"] -= 1

    def upstream(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        return conn


def make_handler(state: ProxyState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def control(self, data: bytes) -> None:
            what = self.path[len(CONTROL):]
            answer = None
            with state.lock:
                if what == "/faults":
                    state.rules = json.loads(data)
                elif what == "/latency":
                    state.latency_s = json.loads(data)["ms"] / 1000
                elif what == "/stats":
                    answer = state.stats
            out = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def error(self, action: str) -> None:
            status, code, message = _ERRORS[action]
            out = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                   f"<Message>{message}</Message></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def forward(self) -> None:
            data = self.body()
            if self.path.startswith(CONTROL):
                return self.control(data)
            if state.latency_s:
                time.sleep(state.latency_s)
            rule = state.fault_for(self.command, self.path, self.headers.get("Range"))
            action = rule and rule["action"]
            if action == "hold":
                state.hold(rule.get("ms", 60_000))
            if action in _ERRORS:
                return self.error(action)
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("transfer-encoding", "connection")}
            headers["Content-Length"] = str(len(data))
            for attempt in range(2):   # a kept-alive upstream connection may have been closed
                conn = state.upstream()
                try:
                    conn.request(self.command, self.path, body=data, headers=headers)
                    answer = conn.getresponse()
                    payload = answer.read()
                    break
                except (http.client.HTTPException, OSError):
                    conn.close()
                    state.local.conn = None
                    if attempt:
                        raise
            self.send_response(answer.status)
            for k, v in answer.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                     "server", "date"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            if action == "cut" and len(payload) > 1:
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload[:len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

    return Handler


def serve_proxy(upstream: str, latency_ms: float) -> None:
    state = ProxyState(upstream, latency_ms)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    server.request_queue_size = 512
    print(f"port {server.server_address[1]}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    proxy = sub.add_parser("proxy", help="a latency and fault proxy in front of an S3 server")
    proxy.add_argument("--upstream", required=True)
    proxy.add_argument("--latency-ms", type=float, default=0.0)
    a = p.parse_args()
    serve_proxy(a.upstream, a.latency_ms)


if __name__ == "__main__":
    main()
