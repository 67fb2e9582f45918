"""A consumer group feeding a Dask cluster: entries per second through the
recipe of docs/scaling.rst (submit each entry, or each batch, as a task; buffer; gather
in order; a sink), on a LocalCluster of worker processes.

    python bench/dask_throughput.py --entries 2000 --batched-entries 50000 --workers 2

Each row times one backlog from start() until every entry is in the sink and
acknowledged (XPENDING 0). The task itself does nothing: what is measured is
the cost of the way through Dask. It starts a redis-server of its own.
"""

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import RedisServer  # noqa: E402


def nothing(x):
    return x


def fill(client, n):
    client.delete("jobs")
    payload = "x" * 54
    with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd("jobs", {"i": i, "p": payload})
        pipe.execute()
    client.xgroup_create("jobs", "workers", "0")


def run(server, client, n, batch, buffer, count, scatter=False):
    import streamz.dask
    from streamz import Stream

    import streamz_redis  # noqa: F401

    with server.client() as r:
        fill(r, n)
        source = Stream.from_redis_consumer_group("jobs", "workers", "w", url=server.url,
                                                  start_id="0", batch=batch, count=count)
        if scatter:
            sink = source.scatter().map(nothing).buffer(buffer).gather().sink(lambda x: None)
        else:
            futures = source.map(lambda x: client.submit(nothing, x, pure=False))
            sink = streamz.dask.gather(futures.buffer(buffer)).sink(lambda x: None)
        began = time.perf_counter()
        source.start()
        while r.xinfo_groups("jobs")[0]["lag"] or r.xpending("jobs", "workers")["pending"]:
            time.sleep(0.005)
        elapsed = time.perf_counter() - began
        source.stop()
        source.destroy()
        del sink
    return n / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=2000, help="backlog, one task per entry")
    parser.add_argument("--batched-entries", type=int, default=50_000,
                        help="backlog, batch=True: one task per read")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--buffer", type=int, default=100, help="tasks in flight")
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    server = RedisServer()
    cluster = LocalCluster(processes=True, n_workers=args.workers, threads_per_worker=1,
                           dashboard_address=None)
    client = Client(cluster)
    try:
        print(f"LocalCluster of {args.workers} worker processes, buffer {args.buffer}, "
              f"count {args.count}")
        rows = [
            ("scatter() per entry", args.entries // 10, False, True),
            ("submit per entry", args.entries, False, False),
            ("submit per batch (batch=True)", args.batched_entries, True, False),
        ]
        for label, n, batch, scatter in rows:
            rate = run(server, client, n, batch, args.buffer, args.count, scatter=scatter)
            print(f"{label:<32} {n:>7} entries  {rate:>9,.0f} entries/s", flush=True)
    finally:
        client.close()
        cluster.close()
        server.close()


if __name__ == "__main__":
    main()
