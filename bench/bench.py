#!/usr/bin/env python
"""Throughput, latency and memory of the streamz-redis sources, next to their
ceilings, measured side by side in one run against a private redis-server.

    python bench/bench.py                      # default sizes, a few minutes
    python bench/bench.py --n 300 --latency-seconds 1 --memory-entries 2000   # CI size

The exit status is 0 whether or not the targets are met (the table says).

Everything runs in one asyncio event loop in the main thread: the sources are
made with ``asynchronous=True, loop=IOLoop.current()`` and so are the streamz
ceilings; the redis-py ceilings are plain ``redis.asyncio`` loops on the same
event loop. (In streamz's default mode the sources run the very same code on a
loop thread while the main thread sleeps; the per-entry path is identical.)

Throughput rows are repeated ``--repeat`` times, interleaved (every row once,
then every row again...), and the best run is reported next to the median.
Ratios are given twice: best over best, and "paired": in each round, the row
over its reference run just before or after it under the same load, then the
median of those; targets are judged on the paired ratio. The load average at
the start and the end of the run is printed with the environment.
A row's time runs from ``start()`` (or, for a redis-py loop, from creating its
client) until the sink has seen ``--n`` elements; for the consumer group also
until XPENDING says nothing is pending.

Batch mode (``batch=True``): the stream sources emit one list of up to
``--count`` entries per read. Their rows run ``source -> map(fields_seen) ->
sink``, where ``fields_seen`` is the per-entry work: it looks at every entry's
fields and returns how many entries had some (the sink adds these up to
``--n``).

Peers, what users would otherwise write, do the very same per-entry work on
each reply (``fields_seen_raw``: the same loop over ``(id, fields)`` pairs) on
the same data: a hand-written ``redis.asyncio`` loop, a hand-written sync
redis-py loop (it blocks the event loop, which has nothing else to do), and
walrus (``ConsumerGroup.read`` + ``ack``, ``Stream.read``; the row is skipped,
with a note, where walrus is not installed: ``pip install walrus``). Each reads
XREAD COUNT, or XREADGROUP COUNT plus one multi-id XACK per reply before the
next read, and keeps redis-py's default parsing (a dict of bytes per entry);
our sources decode fields to ``str``. A second table sets them side by side,
with paired ratios to the ``redis.asyncio`` loop, the CPU time per entry, and
the targets of ``batch=True`` against walrus and the sync loop.

Beside each row's CPU time per entry, its Detail gives Redis's own (the
server's used_cpu_user + used_cpu_sys from INFO, before and after the row, per
entry; not for the cluster row): one Redis core's share, the limit no client
gets past. The ``batch=True`` rows run once more with ``READ_AHEAD = False``
("read-ahead off"): the next read then leaves only once the batch before it
was emitted, as in a hand-written loop, so the two rows show what overlapping
Redis's work with ours is worth. The targets of ``batch=True`` against walrus
and the sync loop: at least PEER_SPEED (1.2) times their throughput, and at
most 1.25 times their CPU per entry (theirs over ours at least PEER_THRIFT).

"The source's own work, no streamz" ceilings do what the stream sources do
without streamz or the source's lifecycle: the same raw reads on a connection
of their own, the same conversion to ``Entry`` (the module's own helpers), the
same ``fields_seen``, and for the group XACK sent as the source sends it,
concurrently with the next read.

Sinks: a bare streamz Source emits ``--n`` dicts (``{"i": i, "p": PAYLOAD}``)
into ``to_redis_stream``, or strings into ``to_redis_list``, awaiting
``asyncio.gather`` only when ``_emit`` returns futures (as the Redis sources
do; the sink returns one only when ``max_in_flight`` elements await Redis).
The time runs from the first emit until ``await sink.flush()`` has returned;
XLEN / LLEN is then checked to be ``--n``. The redis-py ceilings send one XADD,
or one single-value RPUSH, per element, in pipelines of ``--pipeline``
commands (default 1000, the sinks' default ``max_in_flight``: what a
hand-written loop would batch per round trip), one round trip at a time.
``to_redis_list`` merges a run of pushes to one key into one RPUSH; a further
ceiling sends that command (``--pipeline`` values per RPUSH) with no streamz.

"Target" states each row's target and whether this run met it: sources
emitting per entry against the streamz ceiling with the same ack mode,
batch-mode sources against the ``redis.asyncio`` loop, sinks against the
pipelined redis-py loop (0.90).

Latency: a producer *process* XADDs one entry at a time at ``--latency-rate``
entries per second, each carrying the CLOCK_MONOTONIC time of its XADD (that
clock is system-wide on Linux); the sink takes the difference.

Memory: a child process drains a backlog of ``--memory-entries`` entries
through ``from_redis_consumer_group`` into a deliberately slow sink while a
thread samples its VmRSS every 5 ms; growth is peak VmRSS minus the idle
process's VmRSS (after imports, before ``start()`` connects).

Beside the ceilings the spec asks for (a streamz source awaiting
``asyncio.gather(*self._emit(x))`` for every element, as streamz's own sources
do), two "lean" streamz ceilings skip the gather when ``_emit`` returned no
futures, as the Redis sources do; "Detail" also gives the best CPU time per
message (``time.process_time``), steadier than msg/s on a shared machine.

The cluster row: ``from_redis_consumer_group`` reading three streams whose
hash tags put them in three slots, one on each master of a private
three-master Redis Cluster (``redis-cli --cluster create``, no replicas), so
one blocking connection per master feeds the one pipeline; ``--n`` entries in
all, a third in each stream, acks on, timed as the single-server group row
(until XPENDING says nothing is pending in any of the three). Its Detail gives
the paired ratio to that row. It is skipped, with a note, where there is no
``redis-cli`` or the redis-server is older than Redis 7 (no ``--cluster-port``).

Only for Linux (``/proc``). The redis-server binary comes from REDIS_SERVER,
else from PATH; it is started with ``--save "" --appendonly no`` on a free port
and killed at the end (the cluster's three as well).
"""

import argparse
import asyncio
import functools
import gc
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

PAYLOAD = "payload-0123456789"  # every benchmark entry: {"i": <n>, "p": PAYLOAD}


def stamp():
    """(wall, CPU) seconds of this process, to time a row by both."""
    return time.perf_counter(), time.process_time()


def span(t0, end=None):
    """(wall, CPU) seconds from stamp ``t0`` to stamp ``end`` (default now)."""
    end = end or stamp()
    return end[0] - t0[0], end[1] - t0[1]


def now():
    """System-wide monotonic seconds, comparable between processes (Linux)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


# --------------------------------------------------------------------------
# A private redis-server
# --------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    def __init__(self, binary=None):
        self.binary = binary or os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
        if not self.binary:
            sys.exit("bench.py needs a redis-server binary on PATH (or REDIS_SERVER)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="streamz-redis-bench-")
        self.process = None
        self.extra = []  # more redis-server arguments (a cluster node's)

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        import redis

        command = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", self.dir,
            "--daemonize", "no", "--loglevel", "warning", *self.extra,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                sys.exit(f"redis-server exited with {self.process.returncode}: {command}")
            try:
                with redis.Redis(port=self.port, socket_timeout=1) as client:
                    client.ping()
                    self.version = client.info("server")["redis_version"]
                return self
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    self.close()
                    sys.exit(f"redis-server did not answer: {command}")
                time.sleep(0.01)

    def close(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateCluster:
    """Three masters of a Redis Cluster (no replicas) on free ports, all
    16384 slots assigned by ``redis-cli --cluster create``, for the cluster
    row. ``start()`` returns None, with ``why`` set, where it cannot run: no
    redis-cli, or a redis-server without ``--cluster-port`` (before Redis 7)."""

    def __init__(self, binary=None):
        self.binary = binary or os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
        self.cli = shutil.which("redis-cli")
        self.nodes = []
        self.why = None

    @property
    def url(self):
        return self.nodes[0].url

    def start(self):
        import redis

        if not self.cli:
            self.why = "no redis-cli on PATH"
            return None
        for _ in range(3):
            node = PrivateRedis(self.binary)
            node.extra = ["--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                          "--cluster-config-file", "nodes.conf"]
            self.nodes.append(node)
            try:
                node.start()
            except SystemExit as exc:  # before Redis 7: no --cluster-port
                self.why = f"the cluster's redis-server did not start ({exc})"
                self.close()
                return None
        created = subprocess.run(
            [self.cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
             "--cluster-yes"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        if created.returncode:
            self.why = f"redis-cli --cluster create failed: {created.stderr.decode()[-200:]}"
            self.close()
            return None
        deadline = time.monotonic() + 30
        while not self._ready():
            if time.monotonic() > deadline:
                self.why = "the cluster did not become ready within 30 s"
                self.close()
                return None
            time.sleep(0.05)
        with redis.Redis(port=self.nodes[0].port) as r:
            self.version = r.info("server")["redis_version"]
        return self

    def _ready(self):
        import redis

        for node in self.nodes:
            with redis.Redis(port=node.port, socket_timeout=1) as r:
                info = r.execute_command("CLUSTER INFO")
                if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                    return False
        return True

    def owners(self, keys):
        """The URL of the master that owns each key's slot."""
        import redis

        with redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port) as r:
            return {key: f"redis://127.0.0.1:{r.get_node_from_key(key).port}/0" for key in keys}

    def close(self):
        for node in self.nodes:
            node.close()


# --------------------------------------------------------------------------
# Helpers that run on the event loop
# --------------------------------------------------------------------------


def identity(x):
    return x


class Counter:
    """A sink function: counts elements and stamps the time of the n-th."""

    def __init__(self, n):
        self.n = n
        self.seen = 0
        self.done = asyncio.get_running_loop().create_future()

    def __call__(self, x):
        self.seen += 1
        if self.seen == self.n:
            self.done.set_result(stamp())


class SumCounter(Counter):
    """A sink function for batch rows: adds up the numbers it gets (entries
    per batch) and stamps the time the total reaches n."""

    def __call__(self, k):
        self.seen += k
        if self.seen >= self.n and not self.done.done():
            self.done.set_result(stamp())


def fields_seen(batch):
    """The per-entry work of the batch rows (ours): look at each entry's
    fields; how many entries had some."""
    seen = 0
    for entry in batch:
        if entry.fields:
            seen += 1
    return seen


def fields_seen_raw(entries):
    """The same per-entry work on a redis-py reply's ``(id, fields)`` pairs."""
    seen = 0
    for _, fields in entries:
        if fields:
            seen += 1
    return seen


def client(url):
    import redis.asyncio

    return redis.asyncio.from_url(url)


async def fill_stream(url, stream, n, chunk=1000):
    r = client(url)
    for start in range(0, n, chunk):
        async with r.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + chunk)):
                pipe.execute_command("XADD", stream, "*", "i", i, "p", PAYLOAD)
            await pipe.execute()
    await r.aclose()


async def fill_list(url, key, n, chunk=1000):
    r = client(url)
    await r.delete(key)
    for start in range(0, n, chunk):
        await r.rpush(key, *(f"{i}:{PAYLOAD}" for i in range(start, min(n, start + chunk))))
    await r.aclose()


async def wait_or_fail(future, timeout, what):
    try:
        return await asyncio.wait_for(future, timeout)
    except asyncio.TimeoutError:
        raise RuntimeError(f"{what}: timed out after {timeout:.0f} s") from None


def row_timeout(n):
    return 30 + n / 2000


# --------------------------------------------------------------------------
# Ceilings: streamz alone
# --------------------------------------------------------------------------


async def streamz_ceiling(ctx, n, acks, lean=False):
    from streamz import RefCounter
    from streamz.sources import Source
    from tornado.ioloop import IOLoop

    acked = [0]
    all_acked = asyncio.get_running_loop().create_future()

    def on_ack():
        acked[0] += 1
        if acked[0] == n:
            all_acked.set_result(stamp())

    class Numbers(Source):
        """A bare source, emitting as a source does: awaiting each emit."""

        async def run(self):
            if acks and lean:
                for x in range(n):
                    ref = RefCounter(initial=1, cb=on_ack, loop=self.loop)
                    futures = self._emit(x, metadata=[{"ref": ref}])
                    if futures:
                        await asyncio.gather(*futures)
                    ref.release()
            elif acks:
                for x in range(n):
                    ref = RefCounter(initial=1, cb=on_ack, loop=self.loop)
                    await asyncio.gather(*self._emit(x, metadata=[{"ref": ref}]))
                    ref.release()
            elif lean:
                for x in range(n):
                    futures = self._emit(x)
                    if futures:
                        await asyncio.gather(*futures)
            else:
                for x in range(n):
                    await asyncio.gather(*self._emit(x))

    counter = Counter(n)
    source = Numbers(asynchronous=True, loop=IOLoop.current())
    sink = source.map(identity).sink(counter)
    t0 = stamp()
    source.start()
    end = await wait_or_fail(counter.done, row_timeout(n), "streamz ceiling")
    if acks:
        end = max(end, await wait_or_fail(all_acked, row_timeout(n), "streamz acks"))
    source.stop()
    sink.destroy()
    return span(t0, end)


# --------------------------------------------------------------------------
# Ceilings: redis-py alone
# --------------------------------------------------------------------------


async def raw_xreadgroup(ctx, n, count, work=len):
    """XREADGROUP COUNT, ``work`` on each reply's entries, one XACK per batch.
    ``work=len`` only counts; the batch rows' ceiling passes their work."""
    group = ctx.fresh("raw-group")
    t0 = stamp()
    r = client(ctx.url)
    await r.xgroup_create(ctx.stream, group, "0")
    got = 0
    while got < n:
        for name, entries in await r.xreadgroup(group, "c", {ctx.stream: ">"}, count=count):
            got += work(entries)
            await r.xack(name, group, *[entry_id for entry_id, _ in entries])
    elapsed = span(t0)
    await r.aclose()
    return elapsed


async def raw_xread(ctx, n, count, work=len):
    """XREAD COUNT and ``work`` on each reply's entries (see raw_xreadgroup)."""
    t0 = stamp()
    r = client(ctx.url)
    last = "0"
    got = 0
    while got < n:
        for _, entries in await r.xread({ctx.stream: last}, count=count):
            got += work(entries)
            last = entries[-1][0]
    elapsed = span(t0)
    await r.aclose()
    return elapsed


async def raw_lpop(ctx, n, count):
    key = ctx.fresh("raw-list")
    await fill_list(ctx.url, key, n)
    t0 = stamp()
    r = client(ctx.url)
    got = 0
    while got < n:
        items = await r.lpop(key, count)
        got += len(items or ())
    elapsed = span(t0)
    await r.aclose()
    return elapsed


async def raw_xadd(ctx, n, count):
    stream = ctx.fresh("raw-xadd")
    t0 = stamp()
    r = client(ctx.url)
    for start in range(0, n, ctx.pipeline):
        async with r.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + ctx.pipeline)):
                pipe.xadd(stream, {"i": i, "p": PAYLOAD})
            await pipe.execute()
    elapsed = span(t0)
    await r.delete(stream)
    await r.aclose()
    return elapsed


async def raw_rpush_merged(ctx, n, count):
    """The commands ``to_redis_list`` sends: one RPUSH of many values for a
    run of elements to one key, here ``--pipeline`` values at a time."""
    key = ctx.fresh("raw-rpush-merged")
    t0 = stamp()
    r = client(ctx.url)
    for start in range(0, n, ctx.pipeline):
        await r.rpush(key, *(f"{i}:{PAYLOAD}" for i in range(start, min(n, start + ctx.pipeline))))
    elapsed = span(t0)
    await r.delete(key)
    await r.aclose()
    return elapsed


async def raw_rpush(ctx, n, count):
    key = ctx.fresh("raw-rpush")
    t0 = stamp()
    r = client(ctx.url)
    for start in range(0, n, ctx.pipeline):
        async with r.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + ctx.pipeline)):
                pipe.rpush(key, f"{i}:{PAYLOAD}")
            await pipe.execute()
    elapsed = span(t0)
    await r.delete(key)
    await r.aclose()
    return elapsed


# The writes of the sinks of keys, as a user would pipeline them by hand:
# (the element of our row, its redis-py call), per element i of one row's key.
KEY_WRITES = {
    "hash-increment": (lambda key, i: {f"f{i % 100}": 1},
                       lambda pipe, key, i: pipe.hincrby(key, f"f{i % 100}", 1)),
    "sorted-set-increment": (lambda key, i: (f"m{i % 100}", 1),
                             lambda pipe, key, i: pipe.zincrby(key, 1, f"m{i % 100}")),
    "key-ttl": (lambda key, i: (f"{key}:{i % 1000}", f"{i}:{PAYLOAD}"),
                lambda pipe, key, i: pipe.set(f"{key}:{i % 1000}", f"{i}:{PAYLOAD}", ex=60)),
    "set": (lambda key, i: f"{i}:{PAYLOAD}", lambda pipe, key, i: pipe.sadd(key, f"{i}:{PAYLOAD}")),
}


async def raw_key_writes(ctx, n, kind):
    key = ctx.fresh(f"raw-{kind}")
    write = KEY_WRITES[kind][1]
    t0 = stamp()
    r = client(ctx.url)
    for start in range(0, n, ctx.pipeline):
        async with r.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + ctx.pipeline)):
                write(pipe, key, i)
            await pipe.execute()
    elapsed = span(t0)
    await r.aclose()
    return elapsed


async def sync_key_writes(ctx, n, kind):
    """The same writes with the sync redis-py client (which packs with
    hiredis), in a thread: what a quick script would write."""
    import redis as sync_redis

    key = ctx.fresh(f"sync-{kind}")
    write = KEY_WRITES[kind][1]

    def run():
        t0 = stamp()
        with sync_redis.Redis.from_url(ctx.url) as r:
            for start in range(0, n, ctx.pipeline):
                with r.pipeline(transaction=False) as pipe:
                    for i in range(start, min(n, start + ctx.pipeline)):
                        write(pipe, key, i)
                    pipe.execute()
        return span(t0)

    return await asyncio.get_running_loop().run_in_executor(None, run)


# --------------------------------------------------------------------------
# Peers: what a user would otherwise write, doing the same work
# --------------------------------------------------------------------------

# Each peer reads COUNT entries at a time, runs ``fields_seen_raw`` on every
# reply (the per-entry work of our batch rows), and, for a group, sends one
# multi-id XACK per reply before reading on, as the redis-py and walrus
# documentation show. They keep redis-py's default reply parsing (a dict of
# bytes per entry); our sources also decode to str.


def have_walrus():
    import importlib.util

    return importlib.util.find_spec("walrus") is not None


async def peer_asyncio_group(ctx, n, count):
    return await raw_xreadgroup(ctx, n, count, work=fields_seen_raw)


async def peer_asyncio_xread(ctx, n, count):
    return await raw_xread(ctx, n, count, work=fields_seen_raw)


async def peer_sync_group(ctx, n, count):
    """The sync redis-py loop. It blocks the event loop, which has nothing
    else to do while it runs."""
    import redis

    group = ctx.fresh("sync-group")
    t0 = stamp()
    r = redis.Redis.from_url(ctx.url)
    r.xgroup_create(ctx.stream, group, "0")
    got = 0
    while got < n:
        for name, entries in r.xreadgroup(group, "c", {ctx.stream: ">"}, count=count):
            got += fields_seen_raw(entries)
            r.xack(name, group, *[entry_id for entry_id, _ in entries])
    elapsed = span(t0)
    r.close()
    return elapsed


async def peer_sync_xread(ctx, n, count):
    import redis

    t0 = stamp()
    r = redis.Redis.from_url(ctx.url)
    last = "0"
    got = 0
    while got < n:
        for _, entries in r.xread({ctx.stream: last}, count=count):
            got += fields_seen_raw(entries)
            last = entries[-1][0]
    elapsed = span(t0)
    r.close()
    return elapsed


async def peer_walrus_group(ctx, n, count):
    """walrus's ConsumerGroup: ``read(count)``, then ``ack(*ids)``."""
    from walrus import Database

    group = ctx.fresh("walrus-group")
    t0 = stamp()
    db = Database.from_url(ctx.url)
    consumer_group = db.consumer_group(group, {ctx.stream: "0"}, consumer="c")
    consumer_group.create()
    stream = consumer_group.streams[ctx.stream]
    got = 0
    while got < n:
        for _, entries in consumer_group.read(count=count):
            got += fields_seen_raw(entries)
            stream.ack(*[entry_id for entry_id, _ in entries])
    elapsed = span(t0)
    db.close()
    return elapsed


async def peer_walrus_xread(ctx, n, count):
    """walrus's Stream: ``read(count, last_id=...)``."""
    from walrus import Database

    t0 = stamp()
    db = Database.from_url(ctx.url)
    stream = db.Stream(ctx.stream)
    last = "0"
    got = 0
    while got < n:
        entries = stream.read(count=count, last_id=last)
        got += fields_seen_raw(entries)
        last = entries[-1][0]
    elapsed = span(t0)
    db.close()
    return elapsed


# --------------------------------------------------------------------------
# Ceilings that do the sources' own work, without streamz
# --------------------------------------------------------------------------


async def same_work_group(ctx, n, count):
    """What the consumer-group source does per read, with no streamz: the
    same XREADGROUP on a connection of its own with the reply left raw, the
    same conversion to ``Entry`` (decoded fields), ``fields_seen``, and XACK
    sent the way the source sends it, concurrently with the next read (one in
    flight, the ids that arrive meanwhile go in the next)."""
    import streamz_redis as sr

    group = ctx.fresh("same-work-group")
    t0 = stamp()
    pooled = client(ctx.url)
    await pooled.xgroup_create(ctx.stream, group, "0")
    reader = pooled.client()
    reader.set_response_callback("XREADGROUP", sr._raw_reply)
    queued, sending = [], None
    got = 0
    while got < n:
        reply = sr._stream_entries(await reader.execute_command(
            "XREADGROUP", "GROUP", group, "c", "COUNT", count, "STREAMS", ctx.stream, ">",
            **sr.NEVER_DECODE,
        ))
        for name, entries in reply:
            batch = [sr._new_tuple(sr.Entry, (name, entry_id, sr._entry_fields(flat, "utf-8")))
                     for entry_id, flat in entries]
            got += fields_seen(batch)
            queued += [entry.id for entry in batch]
        if queued and (sending is None or sending.done()):
            ids, queued = queued, []
            sending = asyncio.ensure_future(
                sr._Wire.pipelined(pooled, [("XACK", ctx.stream, group, *ids)]))
    if sending is not None:
        await sending
    if queued:
        await sr._Wire.pipelined(pooled, [("XACK", ctx.stream, group, *queued)])
    elapsed = span(t0)
    await reader.aclose()
    await pooled.aclose()
    return elapsed


async def same_work_xread(ctx, n, count):
    """What the XREAD source does per read, with no streamz: the raw reply,
    the same conversion to ``Entry``, ``fields_seen``."""
    import streamz_redis as sr

    t0 = stamp()
    pooled = client(ctx.url)
    reader = pooled.client()
    reader.set_response_callback("XREAD", sr._raw_reply)
    last = "0"
    got = 0
    while got < n:
        reply = sr._stream_entries(await reader.execute_command(
            "XREAD", "COUNT", count, "STREAMS", ctx.stream, last, **sr.NEVER_DECODE,
        ))
        for name, entries in reply:
            batch = [sr._new_tuple(sr.Entry, (name, entry_id, sr._entry_fields(flat, "utf-8")))
                     for entry_id, flat in entries]
            got += fields_seen(batch)
            last = batch[-1].id
    elapsed = span(t0)
    await reader.aclose()
    await pooled.aclose()
    return elapsed


# --------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------


async def run_source(source, n, after=None, batch=False):
    """Time ``source -> map -> sink`` from start() until the sink saw n
    elements (and ``after()`` returned, if given). With ``batch``, the map is
    ``fields_seen`` and the sink adds up its results."""
    if batch:
        counter = SumCounter(n)
        sink = source.map(fields_seen).sink(counter)
    else:
        counter = Counter(n)
        sink = source.map(identity).sink(counter)
    t0 = stamp()
    await source.start()
    try:
        end = await wait_or_fail(counter.done, row_timeout(n), str(source))
        if after is not None:
            end = max(end, await wait_or_fail(after(), row_timeout(n), "XPENDING"))
    finally:
        await source.stop()
        sink.destroy()
    return span(t0, end)


async def ours_list(ctx, n, count):
    import streamz_redis
    from tornado.ioloop import IOLoop

    key = ctx.fresh("list")
    await fill_list(ctx.url, key, n)
    source = streamz_redis.from_redis_list(
        key, url=ctx.url, count=count, asynchronous=True, loop=IOLoop.current()
    )
    return await run_source(source, n)


def read_ahead(on):
    """A row's read-ahead on or off (streamz_redis.READ_AHEAD), set back after it."""
    import streamz_redis

    def wrap(row):
        @functools.wraps(row)
        async def run(*args, **kwargs):
            was, streamz_redis.READ_AHEAD = streamz_redis.READ_AHEAD, on
            try:
                return await row(*args, **kwargs)
            finally:
                streamz_redis.READ_AHEAD = was
        return run
    return wrap


async def ours_streams(ctx, n, count, batch=False, decode=True):
    import streamz_redis
    from tornado.ioloop import IOLoop

    kwargs = {"batch": True} if batch else {}
    if not decode:
        kwargs["decode"] = False
    source = streamz_redis.from_redis_streams(
        ctx.stream, start_id="0", url=ctx.url, count=count,
        asynchronous=True, loop=IOLoop.current(), **kwargs,
    )
    return await run_source(source, n, batch=batch)


async def ours_group(ctx, n, count, batch=False, decode=True):
    import streamz_redis
    from tornado.ioloop import IOLoop

    group = ctx.fresh("group")
    kwargs = {"batch": True} if batch else {}
    if not decode:
        kwargs["decode"] = False
    source = streamz_redis.from_redis_consumer_group(
        ctx.stream, group, "c", start_id="0", url=ctx.url, count=count,
        asynchronous=True, loop=IOLoop.current(), **kwargs,
    )

    async def nothing_pending():
        r = client(ctx.url)
        try:
            while (await r.xpending(ctx.stream, group))["pending"]:
                await asyncio.sleep(0.0005)
            return stamp()
        finally:
            await r.aclose()

    return await run_source(source, n, after=nothing_pending, batch=batch)


# The cluster row's three streams: hash tags {a}, {b} and {c} fall in slots
# 15495, 3300 and 7365, one on each master of a three-master cluster.
CLUSTER_STREAMS = ("{a}:bench", "{b}:bench", "{c}:bench")


async def fill_cluster(cluster, n):
    """n entries over the three streams (a third each), each written on the
    master that owns its slot."""
    owners = cluster.owners(CLUSTER_STREAMS)
    if len(set(owners.values())) != len(CLUSTER_STREAMS):
        raise RuntimeError(f"the cluster row's streams share a master: {owners}")
    for i, stream in enumerate(CLUSTER_STREAMS):
        await fill_stream(owners[stream], stream, n // 3 + (i < n % 3))


async def ours_group_cluster(ctx, n, count):
    """The consumer-group source reading three streams in three slots (one
    blocking connection to each master), acks on, as ``ours_group``."""
    import redis.asyncio
    import streamz_redis
    from tornado.ioloop import IOLoop

    group = ctx.fresh("group")
    source = streamz_redis.from_redis_consumer_group(
        list(CLUSTER_STREAMS), group, "c", start_id="0", url=ctx.cluster.url, cluster=True,
        count=count, asynchronous=True, loop=IOLoop.current(),
    )

    async def nothing_pending():
        r = redis.asyncio.RedisCluster.from_url(ctx.cluster.url)
        try:
            for stream in CLUSTER_STREAMS:
                while (await r.xpending(stream, group))["pending"]:
                    await asyncio.sleep(0.0005)
            return stamp()
        finally:
            await r.aclose()

    return await run_source(source, n, after=nothing_pending)


async def ours_sink(ctx, n, kind):
    """A bare streamz Source emits n dicts into ``to_redis_stream``, or n
    strings into ``to_redis_list``; the time runs from the first emit until
    ``sink.flush()`` returns. Then XLEN / LLEN must be n."""
    import streamz_redis  # noqa: F401  (registers the sinks)
    from streamz.sources import Source
    from tornado.ioloop import IOLoop

    emitted = asyncio.get_running_loop().create_future()

    class Elements(Source):
        """Emits as the Redis sources do: awaits only returned futures."""

        async def run(self):
            try:
                if kind in KEY_WRITES:
                    element = KEY_WRITES[kind][0]
                    for i in range(n):
                        futures = self._emit(element(key, i))
                        if futures:
                            await asyncio.gather(*futures)
                elif kind == "stream":
                    for i in range(n):
                        futures = self._emit({"i": i, "p": PAYLOAD})
                        if futures:
                            await asyncio.gather(*futures)
                else:
                    for i in range(n):
                        futures = self._emit(f"{i}:{PAYLOAD}")
                        if futures:
                            await asyncio.gather(*futures)
            except Exception as exc:
                emitted.set_exception(exc)
            else:
                emitted.set_result(None)

    key = ctx.fresh(f"sink-{kind}")
    source = Elements(asynchronous=True, loop=IOLoop.current())
    if kind == "stream":
        sink = source.to_redis_stream(key, url=ctx.url)
    elif kind == "list":
        sink = source.to_redis_list(key, url=ctx.url)
    elif kind == "hash-increment":
        sink = source.to_redis_hash(key, increment=True, url=ctx.url)
    elif kind == "sorted-set-increment":
        sink = source.to_redis_sorted_set(key, increment=True, url=ctx.url)
    elif kind == "key-ttl":
        sink = source.to_redis_key(ttl=60, url=ctx.url)
    else:
        sink = source.to_redis_set(key, url=ctx.url)
    t0 = stamp()
    source.start()
    try:
        await wait_or_fail(emitted, row_timeout(n), f"to_redis_{kind}: emitting")
        await wait_or_fail(sink.flush(), row_timeout(n), f"to_redis_{kind}: flush")
        end = stamp()
        r = client(ctx.url)
        try:
            if kind == "stream":
                length = await r.xlen(key)
            elif kind == "list":
                length = await r.llen(key)
            elif kind == "hash-increment":
                length = sum(int(v) for v in await r.hvals(key))
            elif kind == "sorted-set-increment":
                length = int(sum(score for _, score in await r.zrange(key, 0, -1, withscores=True)))
            elif kind == "key-ttl":
                # Each of the 1,000 keys holds the last element written to it.
                last = await r.mget([f"{key}:{i}" for i in range(min(n, 1000))])
                length = n if all(int(v.split(b":")[0]) >= n - 1000 for v in last) else -1
            else:
                length = await r.scard(key)
        finally:
            await r.aclose()
        if length != n:
            raise RuntimeError(f"to_redis_{kind}: {length} of {n} elements in Redis after flush()")
    finally:
        source.stop()
        await sink.close()
        sink.destroy()
    return span(t0, end)


# --------------------------------------------------------------------------
# The rows
# --------------------------------------------------------------------------

# name, key, then for our rows the keys of: the streamz ceiling with the
# same ack mode, its lean variant, and the matching redis-py ceiling; last the
# target: (the column it is judged by, "streamz" or "redis-py", the least ratio)
VS_STREAMZ = ("streamz", 0.90)
VS_REDIS_PY = ("redis-py", 0.70)
SINKS_VS_REDIS_PY = ("redis-py", 0.90)
# The sinks of keys: at least the hand-written sync redis-py pipelined loop
# (which packs with hiredis: the faster of the two redis-py loops).
KEY_SINKS_VS_REDIS_PY = ("redis-py", 1.0)
THROUGHPUT_ROWS = [
    ("ceiling: streamz Source -> map -> sink", "streamz-plain", None, None, None, None),
    ("ceiling: streamz + RefCounter per element", "streamz-ref", None, None, None, None),
    ("ceiling: streamz, lean (gather only if futures)", "streamz-plain-lean",
     None, None, None, None),
    ("ceiling: streamz + RefCounter, lean", "streamz-ref-lean", None, None, None, None),
    ("ceiling: redis.asyncio XREADGROUP COUNT + XACK, counting only", "raw-xreadgroup",
     None, None, None, None),
    ("ceiling: redis.asyncio XREAD COUNT, counting only", "raw-xread", None, None, None, None),
    ("ceiling: the group source's reads, Entry building, acks; no streamz", "same-work-group",
     None, None, None, None),
    ("ceiling: the XREAD source's reads and Entry building; no streamz", "same-work-xread",
     None, None, None, None),
    ("ceiling: redis.asyncio LPOP count", "raw-lpop", None, None, None, None),
    ("ceiling: redis.asyncio pipelined XADD, one per element", "raw-xadd",
     None, None, None, None),
    ("ceiling: redis.asyncio pipelined RPUSH, one per element", "raw-rpush",
     None, None, None, None),
    ("ceiling: redis.asyncio RPUSH of --pipeline values at a time", "raw-rpush-merged",
     None, None, None, None),
    ("peer: hand-written redis.asyncio loop, XREADGROUP + XACK", "peer-asyncio-group",
     None, None, None, None),
    ("peer: hand-written sync redis-py loop, XREADGROUP + XACK", "peer-sync-group",
     None, None, None, None),
    ("peer: walrus ConsumerGroup read + ack", "peer-walrus-group", None, None, None, None),
    ("peer: hand-written redis.asyncio loop, XREAD", "peer-asyncio-xread",
     None, None, None, None),
    ("peer: hand-written sync redis-py loop, XREAD", "peer-sync-xread", None, None, None, None),
    ("peer: walrus Stream.read", "peer-walrus-xread", None, None, None, None),
    ("from_redis_list", "ours-list", "streamz-plain", "streamz-plain-lean", "raw-lpop",
     VS_STREAMZ),
    ('from_redis_streams (start_id="0")', "ours-streams", "streamz-plain",
     "streamz-plain-lean", "raw-xread", VS_STREAMZ),
    ('from_redis_consumer_group ("0", acks)', "ours-group", "streamz-ref",
     "streamz-ref-lean", "raw-xreadgroup", VS_STREAMZ),
    ("from_redis_consumer_group, 3 streams in 3 slots, 3-master cluster (acks)",
     "ours-group-cluster", "streamz-ref", "streamz-ref-lean", None, None),
    ('from_redis_streams ("0", batch=True)', "ours-streams-batch", None, None,
     "peer-asyncio-xread", VS_REDIS_PY),
    ('from_redis_consumer_group ("0", batch=True, acks)', "ours-group-batch", None, None,
     "peer-asyncio-group", VS_REDIS_PY),
    ('from_redis_streams ("0", batch=True), read-ahead off', "ours-streams-batch-no-ahead", None,
     None, "peer-asyncio-xread", None),
    ('from_redis_consumer_group ("0", batch=True, acks), read-ahead off', "ours-group-batch-no-ahead",
     None, None, "peer-asyncio-group", None),
    ('from_redis_streams ("0", batch=True, decode=False)', "ours-streams-batch-bytes", None,
     None, "peer-asyncio-xread", None),
    ('from_redis_consumer_group ("0", batch=True, decode=False, acks)', "ours-group-batch-bytes",
     None, None, "peer-asyncio-group", None),
    ("to_redis_stream (XADD)", "ours-sink-stream", None, None, "raw-xadd", SINKS_VS_REDIS_PY),
    ("to_redis_list (RPUSH)", "ours-sink-list", None, None, "raw-rpush",
     SINKS_VS_REDIS_PY),
]
# Each sink of keys: its commands, its row's name; beside it the two
# hand-written loops doing the same writes (KEY_WRITES).
KEY_SINK_ROWS = [
    ("hash-increment", "HINCRBY", "to_redis_hash (increment=True: HINCRBY)"),
    ("sorted-set-increment", "ZINCRBY", "to_redis_sorted_set (increment=True: ZINCRBY)"),
    ("key-ttl", "SET EX", "to_redis_key (ttl=60: SET EX, 1,000 keys)"),
    ("set", "SADD", "to_redis_set (SADD)"),
]
for kind, commands, name in KEY_SINK_ROWS:
    THROUGHPUT_ROWS += [
        (f"ceiling: redis.asyncio pipelined {commands}, one per element", f"raw-{kind}",
         None, None, None, None),
        (f"peer: hand-written sync redis-py pipelined {commands}", f"sync-{kind}",
         None, None, None, None),
        (name, f"ours-sink-{kind}", None, None, f"sync-{kind}", KEY_SINKS_VS_REDIS_PY),
    ]

# The side-by-side table: (contender, its group+ack row, its XREAD row).
PEER_TABLE = [
    ("hand-written redis.asyncio loop", "peer-asyncio-group", "peer-asyncio-xread"),
    ("hand-written sync redis-py loop", "peer-sync-group", "peer-sync-xread"),
    ("walrus", "peer-walrus-group", "peer-walrus-xread"),
    ("ceiling: the source's own work, no streamz", "same-work-group", "same-work-xread"),
    ("streamz_redis per entry", "ours-group", "ours-streams"),
    ("streamz_redis batch=True", "ours-group-batch", "ours-streams-batch"),
    ("streamz_redis batch=True, read-ahead off", "ours-group-batch-no-ahead",
     "ours-streams-batch-no-ahead"),
    # The peers keep redis-py's dict of bytes: the same work, without decoding.
    ("streamz_redis batch=True, decode=False", "ours-group-batch-bytes", "ours-streams-batch-bytes"),
]
PEER_REFERENCE = ("peer-asyncio-group", "peer-asyncio-xread")  # paired ratios are to these
# batch=True must reach these, in throughput and in CPU per entry (paired medians)
# (peer, its group row, its XREAD row): batch=True must reach PEER_SPEED times
# its throughput, and spend at most 1 / PEER_THRIFT times its CPU per entry.
PEER_TARGETS = [("walrus", "peer-walrus-group", "peer-walrus-xread"),
                ("the sync redis-py loop", "peer-sync-group", "peer-sync-xread")]
PEER_SPEED = 1.2
PEER_THRIFT = 0.8  # its CPU per entry over ours: ours at most 1.25 times its
WALRUS_ROWS = {"peer-walrus-group", "peer-walrus-xread"}
CLUSTER_ROWS = {"ours-group-cluster"}  # on a private cluster of their own
# Rows whose Detail also gives a paired ratio to another row: (row, name).
COMPARED_TO = {"ours-group-cluster": ("ours-group", "single server")}

FUNCTIONS = {
    "streamz-plain": lambda ctx, n, count: streamz_ceiling(ctx, n, acks=False),
    "streamz-ref": lambda ctx, n, count: streamz_ceiling(ctx, n, acks=True),
    "streamz-plain-lean": lambda ctx, n, count: streamz_ceiling(ctx, n, acks=False, lean=True),
    "streamz-ref-lean": lambda ctx, n, count: streamz_ceiling(ctx, n, acks=True, lean=True),
    "raw-xreadgroup": raw_xreadgroup,
    "raw-xread": raw_xread,
    "same-work-group": same_work_group,
    "same-work-xread": same_work_xread,
    "raw-lpop": raw_lpop,
    "raw-xadd": raw_xadd,
    "raw-rpush": raw_rpush,
    "raw-rpush-merged": raw_rpush_merged,
    "peer-asyncio-group": peer_asyncio_group,
    "peer-sync-group": peer_sync_group,
    "peer-walrus-group": peer_walrus_group,
    "peer-asyncio-xread": peer_asyncio_xread,
    "peer-sync-xread": peer_sync_xread,
    "peer-walrus-xread": peer_walrus_xread,
    "ours-list": ours_list,
    "ours-streams": ours_streams,
    "ours-group": ours_group,
    "ours-group-cluster": ours_group_cluster,
    "ours-streams-batch": lambda ctx, n, count: ours_streams(ctx, n, count, batch=True),
    "ours-group-batch": lambda ctx, n, count: ours_group(ctx, n, count, batch=True),
    "ours-streams-batch-no-ahead":
        lambda ctx, n, count: read_ahead(False)(ours_streams)(ctx, n, count, batch=True),
    "ours-group-batch-no-ahead":
        lambda ctx, n, count: read_ahead(False)(ours_group)(ctx, n, count, batch=True),
    "ours-streams-batch-bytes":
        lambda ctx, n, count: ours_streams(ctx, n, count, batch=True, decode=False),
    "ours-group-batch-bytes":
        lambda ctx, n, count: ours_group(ctx, n, count, batch=True, decode=False),
    "ours-sink-stream": lambda ctx, n, count: ours_sink(ctx, n, "stream"),
    "ours-sink-list": lambda ctx, n, count: ours_sink(ctx, n, "list"),
    **{f"raw-{kind}": functools.partial(lambda kind, ctx, n, count: raw_key_writes(ctx, n, kind), kind)
       for kind in KEY_WRITES},
    **{f"sync-{kind}": functools.partial(lambda kind, ctx, n, count: sync_key_writes(ctx, n, kind), kind)
       for kind in KEY_WRITES},
    **{f"ours-sink-{kind}": functools.partial(lambda kind, ctx, n, count: ours_sink(ctx, n, kind), kind)
       for kind in KEY_WRITES},
}


class Context:
    def __init__(self, url, pipeline=1000, cluster=None):
        self.url = url
        self.cluster = cluster  # a PrivateCluster, for the cluster row
        self.pipeline = pipeline  # commands per round trip of the redis-py sink loops
        self.stream = "bench:stream"
        self._serial = 0

    def fresh(self, prefix):
        self._serial += 1
        return f"bench:{prefix}:{self._serial}"


async def throughput(args, url, only=None, cluster=None):
    ctx = Context(url, args.pipeline, cluster)
    await fill_stream(url, ctx.stream, args.n)
    rows = [row for row in THROUGHPUT_ROWS if only is None or row[1] in only]
    if not have_walrus():
        rows = [row for row in rows if row[1] not in WALRUS_ROWS]
    if cluster is None:
        rows = [row for row in rows if row[1] not in CLUSTER_ROWS]
    else:
        await fill_cluster(cluster, args.n)
    rates = {row[1]: [] for row in rows}
    cpu = {row[1]: [] for row in rows}
    # (not for the cluster row, whose servers are others, nor for the streamz ceilings, which use none)
    redis_cpu = {row[1]: [] for row in rows if row[1] not in CLUSTER_ROWS and not row[1].startswith("streamz-")}
    for _ in range(args.repeat):
        for key in rates:
            gc.collect()
            before = await redis_cpu_seconds(url)
            wall, cpu_seconds = await FUNCTIONS[key](ctx, args.n, args.count)
            if key in redis_cpu:
                redis_cpu[key].append((await redis_cpu_seconds(url) - before) / args.n * 1e6)
            rates[key].append(args.n / wall)
            cpu[key].append(cpu_seconds / args.n * 1e6)
            r = client(url)  # drop what the row left behind, but keep the backlog
            keys = [k for k in await r.keys("bench:*") if k != ctx.stream.encode()]
            if keys:
                await r.delete(*keys)
            await r.aclose()
    r = client(url)
    await r.delete(ctx.stream)
    await r.aclose()
    return rates, cpu, redis_cpu


async def redis_cpu_seconds(url):
    """The Redis server's own CPU time so far (INFO cpu: user + system), the
    physical limit of one Redis core: a row's share per entry is beside it."""
    r = client(url)
    try:
        info = await r.info("cpu")
    finally:
        await r.aclose()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


# --------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------


def produce(url, stream, rate, seconds):
    """The latency producer (a child process): XADD one entry at a time at a
    steady rate, each stamped with the time of its XADD; print how many."""
    import redis

    r = redis.Redis.from_url(url)
    r.ping()
    interval = 1.0 / rate
    start = now()
    end = start + seconds
    sent = 0
    while True:
        t = now()
        if t >= end:
            break
        due = start + sent * interval
        if t < due:
            time.sleep(due - t)
        r.xadd(stream, {"t": repr(now()), "i": sent})
        sent += 1
    print(sent, flush=True)


async def latency(args, url, which):
    import streamz_redis
    from tornado.ioloop import IOLoop

    stream = f"bench:latency:{which}"
    if which == "streams":
        source = streamz_redis.from_redis_streams(
            stream, url=url, count=args.count, asynchronous=True, loop=IOLoop.current()
        )
    else:
        source = streamz_redis.from_redis_consumer_group(
            stream, "latency", "c", url=url, count=args.count,
            asynchronous=True, loop=IOLoop.current(),
        )
    samples = []

    def record(entry):
        samples.append(now() - float(entry.fields["t"]))

    sink = source.map(identity).sink(record)
    await source.start()
    producer = await asyncio.create_subprocess_exec(
        sys.executable, os.path.abspath(__file__), "--_produce", url, stream,
        str(args.latency_rate), str(args.latency_seconds),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await producer.communicate()
    sent = int(out.decode().split()[-1])
    deadline = now() + 5
    while len(samples) < sent and now() < deadline:
        await asyncio.sleep(0.01)
    await source.stop()
    sink.destroy()
    r = client(url)
    await r.delete(stream)
    await r.aclose()
    warmup = int(args.latency_rate * args.latency_warmup)
    kept = sorted(samples[warmup:] if len(samples) > 2 * warmup else samples)
    if not kept:
        raise RuntimeError(f"latency {which}: no entry reached the sink")

    def pct(p):
        return kept[min(len(kept) - 1, int(p / 100 * len(kept)))] * 1000

    return {
        "p50": pct(50), "p99": pct(99), "max": kept[-1] * 1000,
        "samples": len(kept), "sent": sent, "received": len(samples),
    }


# --------------------------------------------------------------------------
# Memory (in a child process, so that "idle" means idle)
# --------------------------------------------------------------------------


def vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def memory_child(url, stream, entries, count, every, pause, max_seconds):
    """Drain ``stream`` through a consumer group into a slow sink; print JSON."""
    import redis.asyncio  # noqa: F401  (imported before measuring idle)
    import streamz_redis
    from tornado.ioloop import IOLoop

    async def main():
        source = streamz_redis.from_redis_consumer_group(
            stream, "memory", "c", start_id="0", url=url, count=count,
            asynchronous=True, loop=IOLoop.current(),
        )
        done = asyncio.get_running_loop().create_future()
        seen = [0]

        def slow(entry):
            seen[0] += 1
            if seen[0] == entries and not done.done():
                done.set_result(None)
            if seen[0] % every == 0:
                return asyncio.sleep(pause)  # awaited by the source: back-pressure
            return None

        sink = source.map(identity).sink(slow)
        gc.collect()
        idle = vm("VmRSS")
        peak = [idle]
        sampling = threading.Event()

        def sample():
            while not sampling.wait(0.005):
                peak[0] = max(peak[0], vm("VmRSS"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        await source.start()
        try:
            await asyncio.wait_for(done, max_seconds)
        except asyncio.TimeoutError:
            pass
        elapsed = time.perf_counter() - t0
        await source.stop()
        sampling.set()
        sampler.join()
        peak[0] = max(peak[0], vm("VmRSS"))
        sink.destroy()
        print(json.dumps({
            "idle": idle, "peak": peak[0], "hwm": vm("VmHWM"),
            "drained": seen[0], "seconds": elapsed,
        }), flush=True)

    asyncio.run(main())


async def memory(args, url):
    stream = "bench:memory"
    t0 = time.perf_counter()
    await fill_stream(url, stream, args.memory_entries)
    fill_seconds = time.perf_counter() - t0
    child = await asyncio.create_subprocess_exec(
        sys.executable, os.path.abspath(__file__), "--_memory", url, stream,
        str(args.memory_entries), str(args.count), str(args.memory_sink_every),
        str(args.memory_sink_pause), str(args.memory_max_seconds),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await child.communicate()
    if child.returncode:
        raise RuntimeError(f"memory child failed with {child.returncode}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["fill_seconds"] = fill_seconds
    r = client(url)
    await r.delete(stream)
    await r.aclose()
    return result


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------


def grid(header, rows):
    """A reStructuredText grid table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(char="-"):
        return "+" + "+".join(char * (w + 2) for w in widths) + "+"

    def cells(row):
        return "|" + "|".join(f" {str(c):<{w}} " for c, w in zip(row, widths)) + "|"

    out = [line(), cells(header), line("=")]
    for row in rows:
        out += [cells(row), line()]
    return "\n".join(out)


# The docs' tables (--rst): the main table's rows by topic, as the name of a
# row tells it, each a list-table without the columns it leaves empty.
RST_TOPICS = [
    ("The ceilings: streamz alone, redis-py alone, and the sources' own work without streamz:",
     lambda name: name.startswith("ceiling:") and "pipelined" not in name and "RPUSH of" not in name),
    ("The peers: what users would otherwise write:",
     lambda name: name.startswith("peer:") and "pipelined" not in name),
    ("The sources, one entry per emit:",
     lambda name: name.startswith("from_redis") and "batch=True" not in name),
    ("The sources with ``batch=True``:", lambda name: name.startswith("from_redis")),
    ("The sinks, beside the hand-written pipelined loops doing the same writes:",
     lambda name: "pipelined" in name or "RPUSH of" in name or name.startswith("to_redis")),
    ("Latency and memory:", lambda name: True),
]


def list_table(header, rows):
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *rows]:
        for i, cell in enumerate(row):
            lines.append(("   * - " if i == 0 else "     - ") + str(cell).strip())
    return "\n".join(line.rstrip() for line in lines)


def rst_tables(header, rows):
    """The main table as the docs show it: a list-table per topic."""
    out, left = [], list(rows)
    for title, belongs in RST_TOPICS:
        mine = [row for row in left if belongs(row[0])]
        left = [row for row in left if row not in mine]
        if not mine:
            continue
        keep = [i for i in range(len(header)) if i == 0 or any(str(row[i]).strip() for row in mine)]
        out += [title, "", list_table([header[i] for i in keep], [[row[i] for i in keep] for row in mine]), ""]
    return "\n".join(out)


def rst_peer_tables(header, rows):
    """The side-by-side table as the docs show it: group + ack, then XREAD."""
    out = []
    for title, columns in (("Reading a consumer group and acknowledging (XREADGROUP + XACK):", range(1, 5)),
                           ("Reading with XREAD:", range(5, 9))):
        keep = [0, *columns]
        out += [title, "", list_table([header[i].strip() for i in keep], [[row[i] for i in keep] for row in rows]), ""]
    return "\n".join(out)


def rate_text(value):
    return f"{value:,.0f} msg/s"


def verdict(ok):
    return "met" if ok else "MISSED"


def paired(values, key, other):
    """The median over rounds of ``values[key][i] / values[other][i]``: each
    ratio compares two runs made one after the other, under the same load."""
    pairs = list(zip(values[key], values[other]))
    return statistics.median(a / b for a, b in pairs) if pairs else None


def table(args, rates, cpu, redis_cpu, latencies, mem, render=None):
    header = ["Benchmark", "Result", "Detail", "vs streamz", "vs lean", "vs redis-py",
              "Target"]
    rows = []
    best = {key: max(values) for key, values in rates.items()}

    def ratio(key, other):
        if other not in best:
            return ""
        return f"{best[key] / best[other]:.2f} (paired {paired(rates, key, other):.2f})"

    for name, key, streamz_key, lean_key, raw_key, goal in THROUGHPUT_ROWS:
        if key not in rates:
            continue
        values = rates[key]
        detail = (f"median {statistics.median(values):,.0f} of {len(values)}; "
                  f"CPU {min(cpu[key]):.1f} us/msg")
        if redis_cpu.get(key):
            detail += f"; Redis CPU {statistics.median(redis_cpu[key]):.1f} us/msg"
        if key in COMPARED_TO and COMPARED_TO[key][0] in rates:
            other, what = COMPARED_TO[key]
            detail += f"; {paired(rates, key, other):.2f} of the {what} row (paired)"
        target = ""
        if goal is not None:
            column, least = goal
            other = streamz_key if column == "streamz" else raw_key
            if other in best:
                ok = paired(rates, key, other) >= least
                target = f">= {least:.2f} vs {column} (paired): {verdict(ok)}"
            else:
                target = f">= {least:.2f} vs {column}: ceiling not run"
        rows.append([name, rate_text(best[key]), detail, ratio(key, streamz_key),
                     ratio(key, lean_key), ratio(key, raw_key), target])
    for which, name in (("streams", "from_redis_streams"), ("group", "from_redis_consumer_group")):
        if which in latencies:
            lat = latencies[which]
            ok = lat["p50"] < 1 and lat["p99"] < 5
            rows.append([
                f"latency XADD -> sink, {name}",
                f"p50 {lat['p50']:.2f} ms",
                f"p99 {lat['p99']:.2f} ms, max {lat['max']:.1f} ms, "
                f"{lat['samples']:,} at {args.latency_rate:,}/s",
                "", "", "", f"p50 < 1, p99 < 5 ms: {verdict(ok)}",
            ])
    if mem is not None:
        growth = (mem["peak"] - mem["idle"]) / 2**20
        complete = mem["drained"] >= args.memory_entries
        rows.append([
            "memory, consumer group, slow sink",
            f"+{growth:.1f} MB RSS",
            f"idle {mem['idle'] / 2**20:.0f} MB, peak {mem['peak'] / 2**20:.0f} MB; "
            f"{mem['drained']:,}/{args.memory_entries:,} entries"
            f"{'' if complete else ' (time cap)'} in {mem['seconds']:.0f} s",
            "", "", "", f"< 50 MB: {verdict(growth < 50)}",
        ])
    return (render or grid)(header, rows)


def peer_table(rates, cpu, redis_cpu, render=None):
    """Side by side with what users would otherwise write, and the targets
    of ``batch=True`` against them. Redis's own CPU per entry is beside each:
    one Redis core's limit, however fast the client."""
    header = ["Contender", "group + ack", "vs asyncio loop (paired)", "CPU us/entry",
              "Redis us/entry", "XREAD", "vs asyncio loop (paired)", "CPU us/entry ",
              "Redis us/entry "]
    rows = []
    for name, *keys in PEER_TABLE:
        row = [name]
        for key, reference in zip(keys, PEER_REFERENCE):
            if key not in rates:
                row += ["not run", "", "", ""]
                continue
            ratio = paired(rates, key, reference) if reference in rates else None
            row += [rate_text(max(rates[key])), "" if ratio is None else f"{ratio:.2f}",
                    f"{statistics.median(cpu[key]):.2f}",
                    f"{statistics.median(redis_cpu[key]):.2f}" if redis_cpu.get(key) else ""]
        rows.append(row)
    out = [(render or grid)(header, rows), ""]
    for how, ours in (("", ("ours-group-batch", "ours-streams-batch")),
                      (", decode=False", ("ours-group-batch-bytes", "ours-streams-batch-bytes"))):
        for peer, *keys in PEER_TARGETS:
            for what, key, mine in zip(("group + ack", "XREAD"), keys, ours):
                if key not in rates or mine not in rates:
                    continue
                speed = paired(rates, mine, key)
                thrift = paired(cpu, key, mine)  # their CPU per entry over ours
                out.append(
                    ("- " if render else "") +
                    f"target: batch=True{how} {what} against {peer}: throughput {speed:.2f} "
                    f"(>= {PEER_SPEED:.2f}: {verdict(speed >= PEER_SPEED)}), its CPU per entry "
                    f"over ours {thrift:.2f} (>= {PEER_THRIFT:.2f}: {verdict(thrift >= PEER_THRIFT)})")
    if not have_walrus():
        out.append("walrus is not installed (pip install walrus, or the bench extra): "
                   "its rows were skipped")
    return "\n".join(out)


def reproduce(args):
    parts = [
        "python bench/bench.py", f"--n {args.n}", f"--count {args.count}",
        f"--pipeline {args.pipeline}",
        f"--repeat {args.repeat}", f"--latency-seconds {args.latency_seconds:g}",
        f"--latency-rate {args.latency_rate}", f"--memory-entries {args.memory_entries}",
        f"--memory-sink-every {args.memory_sink_every}",
        f"--memory-sink-pause {args.memory_sink_pause:g}",
    ]
    if args.skip_latency:
        parts.append("--skip-latency")
    if args.skip_memory:
        parts.append("--skip-memory")
    if args.only:
        parts.append("--only " + shlex.quote(",".join(args.only)))
    return " ".join(parts)


def environment(server):
    import redis
    import streamz
    import streamz_redis
    import tornado

    try:
        import hiredis
    except ImportError:  # redis-py falls back to its pure-Python parser
        parser = "no hiredis: the pure-Python parser"
    else:
        parser = f"hiredis {hiredis.__version__}"
    return (
        f"Python {platform.python_version()}, streamz {streamz.__version__}, "
        f"redis-py {redis.__version__} ({parser}), "
        f"tornado {tornado.version}, redis-server {server.version}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}; streamz_redis from "
        f"{os.path.relpath(streamz_redis.__file__)}"
    )


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000, help="entries per throughput row")
    p.add_argument("--count", type=int, default=100,
                   help="entries per read (COUNT), and per batch with batch=True")
    p.add_argument("--pipeline", type=int, default=1000,
                   help="commands per round trip of the redis-py XADD / RPUSH loops "
                        "(default: the sinks' default max_in_flight)")
    p.add_argument("--repeat", type=int, default=5, help="runs of each throughput row")
    p.add_argument("--only", type=lambda s: s.split(","), default=None,
                   help="comma-separated throughput rows: " + ",".join(FUNCTIONS))
    p.add_argument("--latency-seconds", type=float, default=10.0)
    p.add_argument("--latency-rate", type=int, default=1000, help="entries per second")
    p.add_argument("--latency-warmup", type=float, default=0.2,
                   help="seconds of first samples left out")
    p.add_argument("--memory-entries", type=int, default=1_000_000)
    p.add_argument("--memory-sink-every", type=int, default=100,
                   help="the slow sink pauses after every this many entries...")
    p.add_argument("--memory-sink-pause", type=float, default=0.001,
                   help="...for this many seconds (awaited: back-pressure)")
    p.add_argument("--memory-max-seconds", type=float, default=300)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    p.add_argument("--rst", metavar="FILE", help="also write the tables as the docs show them "
                   "(docs/performance-run.rst)")
    p.add_argument("--_produce", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--_memory", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        unknown = set(args.only) - set(FUNCTIONS)
        if unknown:
            p.error(f"--only: unknown rows {sorted(unknown)}; choose from {','.join(FUNCTIONS)}")
    return args


def main(argv=None):
    args = parse(argv)
    if args._produce:
        url, stream, rate, seconds = args._produce
        return produce(url, stream, float(rate), float(seconds))
    if args._memory:
        url, stream, entries, count, every, pause, max_seconds = args._memory
        return memory_child(url, stream, int(entries), int(count), int(every),
                            float(pause), float(max_seconds))

    server = PrivateRedis().start()
    cluster = cluster_note = None
    if not args.skip_throughput and (args.only is None or CLUSTER_ROWS & set(args.only)):
        cluster = PrivateCluster()
        if cluster.start() is None:
            cluster_note = f"the cluster row was skipped: {cluster.why}"
            cluster = None
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    rates, cpu, redis_cpu, latencies, mem = {}, {}, {}, {}, None
    try:
        async def run():
            nonlocal rates, cpu, redis_cpu, mem
            if not args.skip_throughput:
                print(f"throughput: {args.n:,} entries per row, {args.repeat} runs ...",
                      file=sys.stderr, flush=True)
                rates, cpu, redis_cpu = await throughput(args, server.url, args.only, cluster)
            if not args.skip_latency:
                for which in ("streams", "group"):
                    print(f"latency {which}: {args.latency_seconds:g} s at "
                          f"{args.latency_rate}/s ...", file=sys.stderr, flush=True)
                    latencies[which] = await latency(args, server.url, which)
            if not args.skip_memory:
                print(f"memory: {args.memory_entries:,} entries ...",
                      file=sys.stderr, flush=True)
                mem = await memory(args, server.url)

        asyncio.run(run())
        env = environment(server)
        if cluster is not None:
            env += f"; the cluster row: 3 masters, redis-server {cluster.version}"
    finally:
        server.close()
        if cluster is not None:
            cluster.close()
    print()
    load_at_end = os.getloadavg()
    load = (f"load average {' '.join(f'{x:.2f}' for x in load_at_start)} at the start, "
            f"{' '.join(f'{x:.2f}' for x in load_at_end)} at the end")
    print(env + f"; {time.perf_counter() - started:.0f} s in all; {load}")
    print()
    print(table(args, rates, cpu, redis_cpu, latencies, mem))
    if cluster_note:
        print(cluster_note)
    if rates:
        print()
        print(peer_table(rates, cpu, redis_cpu))
    print()
    print("reproduce with: " + reproduce(args))
    if args.rst:
        with open(args.rst, "w") as f:
            f.write("\n".join([
                ".. The output of bench/bench.py --rst; regenerate it, do not edit it.", "",
                f"This run: {env}; {time.perf_counter() - started:.0f} s in all; {load}.", "",
                table(args, rates, cpu, redis_cpu, latencies, mem, render=rst_tables), "",
                "Side by side with what users would otherwise write, with Redis's own CPU per "
                "entry beside each (one Redis core's limit, however fast the client):", "",
                peer_table(rates, cpu, redis_cpu, render=rst_peer_tables) if rates else "", "",
                "Reproduce with:", "", ".. code-block:: sh", "", "    " + reproduce(args), "",
            ]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rates": rates, "cpu_us_per_msg": cpu, "redis_cpu_us_per_msg": redis_cpu,
                       "latency": latencies, "memory": mem,
                       "argv": sys.argv[1:], "environment": env, "load": load}, f, indent=1)


if __name__ == "__main__":
    main()
