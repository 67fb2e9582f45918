"""Scaling a consumer group out with processes: 1, 2, 4 ... consumers.

Each run fills one stream with a backlog of ``--n`` entries of 64 bytes,
starts the consumer processes (same group, one consumer name each,
``claim_idle``, ``batch=True`` unless ``--per-entry``), lets them go at once,
and times until the group has read and acknowledged every entry. It prints,
per number of processes: the total throughput, each process's share, and
Redis's CPU time per entry and its CPU use (``INFO cpu``, used_cpu_sys +
used_cpu_user, before and after), the figure that says when Redis itself
becomes the limit (a redis-server uses one core: at 100 % it is the limit).

    python bench/scale.py --n 100000 --processes 1 2 4 --repeat 3
    python bench/scale.py --n 50000 --processes 1 2 4 --repeat 3 --per-entry

It starts a redis-server of its own on a free port (``redis-server`` from
PATH, or REDIS_SERVER), as the tests do.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import RedisServer  # noqa: E402

# One consumer process: reads as consumer <name> until told to stop, then
# prints how many entries it acknowledged.
CONSUMER = """
import sys
import redis
from streamz import Stream
import streamz_redis

url, name, batch, count = sys.argv[1], sys.argv[2], sys.argv[3] == "batch", int(sys.argv[4])
control = redis.Redis.from_url(url, socket_timeout=None)
source = Stream.from_redis_consumer_group(
    "backlog", "workers", name, url=url, start_id="0", count=count, batch=batch,
    claim_idle=30,
)
source.sink(lambda x: None)
print("ready", flush=True)
control.blpop("go:" + name)
source.start()
control.blpop("stop:" + name)
source.stop()
print(source.metrics()["acked"], flush=True)
"""


def fill(client, n, size=64):
    client.delete("backlog")
    payload = "x" * (size - 10)
    with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd("backlog", {"i": i, "p": payload})
            if i % 10_000 == 9_999:
                pipe.execute()
        pipe.execute()
    client.xgroup_create("backlog", "workers", "0")


def redis_cpu(client):
    info = client.info("cpu")
    return info["used_cpu_sys"] + info["used_cpu_user"]


def run_once(server, processes, n, batch, count):
    with server.client() as client:
        fill(client, n)
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", CONSUMER, server.url, f"consumer-{k}",
                 "batch" if batch else "entry", str(count)],
                stdout=subprocess.PIPE, text=True, cwd=HERE.parent,
            )
            for k in range(processes)
        ]
        for worker in workers:
            assert worker.stdout.readline().strip() == "ready"
        cpu_before = redis_cpu(client)
        began = time.perf_counter()
        for k in range(processes):
            client.rpush(f"go:consumer-{k}", 1)
        while True:
            [group] = client.xinfo_groups("backlog")
            last = client.xinfo_stream("backlog")["last-generated-id"]
            if group["pending"] == 0 and group["last-delivered-id"] == last:
                break
            time.sleep(0.002)
        elapsed = time.perf_counter() - began
        cpu = redis_cpu(client) - cpu_before
        for k in range(processes):
            client.rpush(f"stop:consumer-{k}", 1)
        acked = [int(worker.communicate()[0].split()[-1]) for worker in workers]
        client.delete(*[f"go:consumer-{k}" for k in range(processes)])
    assert sum(acked) == n, (acked, n)
    return elapsed, cpu, acked


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="entries in the backlog")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the median is shown")
    parser.add_argument("--count", type=int, default=100, help="entries per read")
    parser.add_argument("--per-entry", action="store_true", help="batch=False")
    args = parser.parse_args()
    batch = not args.per_entry
    server = RedisServer()
    try:
        print(f"{args.n} entries of 64 B, count={args.count}, batch={batch}, "
              f"{os.cpu_count()} cores, median of {args.repeat}")
        print(f"{'processes':>9} {'total/s':>9} {'per process/s':>14} {'Redis us/entry':>15} "
              f"{'Redis CPU':>10}")
        for processes in args.processes:
            runs = [run_once(server, processes, args.n, batch, args.count)
                    for _ in range(args.repeat)]
            elapsed = statistics.median(run[0] for run in runs)
            cpu = statistics.median(run[1] for run in runs)
            total = args.n / elapsed
            print(f"{processes:>9} {total:>9,.0f} {total / processes:>14,.0f} "
                  f"{cpu / args.n * 1e6:>15.1f} {cpu / elapsed:>9.0%}", flush=True)
    finally:
        server.close()


if __name__ == "__main__":
    main()
