#!/usr/bin/env python
"""Throughput of a consume-transform-produce pipeline with and without
``exactly_once=True``, side by side in one run, against a private redis-server.

    python bench/exactly_once.py              # 20,000 entries, 3 rounds, every sink
    python bench/exactly_once.py --n 2000 --rounds 1 --sink stream

Each round runs ``from_redis_consumer_group -> map -> to_redis_stream`` (and
``-> to_redis_list``, and counters: ``-> to_redis_hash(increment=True)`` into
100 fields, ``-> to_redis_sorted_set(increment=True)`` into 100 members)
over the same backlog of ``--n`` entries, once with and
once without ``exactly_once`` (interleaved), from ``start()`` until nothing is
pending and every result is stored. It prints entries per second and the CPU
time of this process per entry, then per sink the paired ratio (exactly_once /
plain, per round, then the median; target >= 0.7).
"""

import argparse
import os
import resource
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

import redis
from streamz import Stream

import streamz_redis  # noqa: F401  (registers the nodes)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(url, n, sink, exactly_once):
    r = redis.Redis.from_url(url)
    r.flushall()
    with r.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd("in", {"i": i, "p": "x" * 50})
        pipe.execute()
    source = Stream.from_redis_consumer_group("in", "g", "c", start_id="0", url=url)
    if sink == "stream":
        source.map(lambda e: {"source": e.id}).to_redis_stream("out", url=url, exactly_once=exactly_once)
        written = r.xlen
    elif sink == "list":  # a list sink, whose plain writes merge into one RPUSH per round trip
        source.map(lambda e: e.id).to_redis_list("out", url=url, exactly_once=exactly_once)
        written = r.llen
    elif sink == "hash":  # counters: 100 fields of one hash, one added per entry
        source.map(lambda e: {f"f{int(e.fields['i']) % 100}": 1}).to_redis_hash(
            "out", increment=True, url=url, exactly_once=exactly_once)

        def written(key):
            return sum(int(v) for v in r.hvals(key))
    else:  # a leaderboard: 100 members, a point added per entry
        source.map(lambda e: (f"m{int(e.fields['i']) % 100}", 1)).to_redis_sorted_set(
            "out", increment=True, url=url, exactly_once=exactly_once)

        def written(key):
            return int(sum(score for _, score in r.zrange(key, 0, -1, withscores=True)))
    began, cpu_began = time.perf_counter(), cpu()
    source.start()
    while written("out") < n or r.xpending("in", "g")["pending"]:
        time.sleep(0.005)
    seconds, cpu_seconds = time.perf_counter() - began, cpu() - cpu_began
    source.stop()
    assert written("out") == n
    r.close()
    return n / seconds, cpu_seconds / n * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sink", choices=["stream", "list", "hash", "sorted_set", "all"], default="all")
    args = p.parse_args()
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    port, folder = free_port(), tempfile.mkdtemp()
    server = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no",
                               "--dir", folder], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        print(f"load average at start: {os.getloadavg()}")
        sinks = ["stream", "list", "hash", "sorted_set"] if args.sink == "all" else [args.sink]
        rows = {(sink, eo): [] for sink in sinks for eo in (False, True)}
        for _ in range(args.rounds):
            for sink in sinks:
                for exactly_once in (False, True):
                    rows[sink, exactly_once].append(run(url, args.n, sink, exactly_once))
        for (sink, exactly_once), runs in rows.items():
            rates = [rate for rate, _ in runs]
            cpus = [c for _, c in runs]
            print(f"to_redis_{sink:10} exactly_once={exactly_once!s:5}: median "
                  f"{statistics.median(rates):8,.0f} entries/s, best {max(rates):8,.0f}; "
                  f"CPU {statistics.median(cpus):5.1f} us/entry")
        for sink in sinks:
            ratios = [eo[0] / plain[0] for plain, eo in zip(rows[sink, False], rows[sink, True])]
            ratio = statistics.median(ratios)
            print(f"to_redis_{sink}: paired ratio exactly_once/plain {ratio:.2f} "
                  f"(target >= 0.70: {'met' if ratio >= 0.7 else 'MISSED'})")
        print(f"load average at end: {os.getloadavg()}")
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
