#!/usr/bin/env python
"""Profile one throughput row of bench.py with cProfile, and say where its
time goes: this library, streamz, redis-py, the event loop, system calls.

    python bench/profile_row.py ours-group-batch              # 100,000 entries, count 100
    python bench/profile_row.py ours-group --n 50000 --top 15

The row runs once to warm up, then once under the profiler, against a
private redis-server (as in bench.py). cProfile inflates Python calls far
more than C calls, so read the shares side by side, between rows profiled
in the same conditions, not as absolute times.

"streamz emit" is the inclusive time of streamz's ``Stream._emit`` called by
this library: everything streamz does per element (its nodes, its weak
downstream sets, RefCounter), with the benchmark's own ``map``/``sink``
functions inside it (given apart).
"""

import argparse
import asyncio
import cProfile
import os
import pstats
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (puts the checkout first on sys.path)


def where(filename, function):
    """The part of the stack a profiled function belongs to."""
    if "streamz_redis" in filename:
        return "streamz_redis (this library)"
    if "/streamz/" in filename or filename.endswith(("_weakrefset.py", "inspect.py")):
        # streamz keeps downstreams in weak sets and checks sink results
        # with inspect.isawaitable, per element.
        return "streamz (its nodes, weak sets, RefCounter)"
    if "/redis/" in filename:
        return "redis-py (client, connection, parsing)"
    if "/asyncio/" in filename or "selectors" in filename:
        return "asyncio event loop"
    if filename.endswith("bench.py"):
        return "the benchmark's own work (map, sink, counters)"
    if filename == "~":
        if "socket" in function or "poll" in function:
            return "system calls (send, recv, epoll)"
        if "hiredis" in function:
            return "hiredis (C parser and packer)"
        return "built-ins (decode, dict, list, ...)"
    return "other"


def report(stats, top):
    total = stats.total_tt
    shares = {}
    for (filename, _, function), (_, _, own, _, _) in stats.stats.items():
        part = where(filename, function)
        shares[part] = shares.get(part, 0.0) + own
    print(f"{total:.2f} s profiled, by where the code lives (own time):")
    for part, seconds in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {part:48s} {seconds:6.3f} s  {100 * seconds / total:5.1f} %")
    for (filename, _, function), (_, _, _, _, callers) in stats.stats.items():
        if filename.endswith("streamz/core.py") and function == "_emit":
            ours = sum(c[3] for key, c in callers.items() if "streamz_redis" in key[0])
            work = sum(v[2] for key, v in stats.stats.items() if key[0].endswith("bench.py"))
            print(f"streamz emit, inclusive, called by streamz_redis: {ours:.3f} s "
                  f"({100 * ours / total:.1f} %), the benchmark's functions included ({work:.3f} s)")
    print()
    stats.sort_stats("tottime").print_stats(top)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("row", choices=sorted(bench.FUNCTIONS))
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--top", type=int, default=20, help="functions listed by own time")
    p.add_argument("--save", metavar="FILE", help="also write the raw profile here")
    args = p.parse_args()
    server = bench.PrivateRedis().start()
    profile = cProfile.Profile()
    try:
        async def run():
            ctx = bench.Context(server.url)
            await bench.fill_stream(server.url, ctx.stream, args.n)
            await bench.FUNCTIONS[args.row](ctx, min(args.n, 20_000), args.count)  # warm up
            profile.enable()
            wall, cpu = await bench.FUNCTIONS[args.row](ctx, args.n, args.count)
            profile.disable()
            return wall, cpu

        wall, cpu = asyncio.run(run())
    finally:
        server.close()
    print(f"{args.row}: {args.n:,} entries, count {args.count}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; under the profiler "
          f"{args.n / wall:,.0f} msg/s, CPU {cpu / args.n * 1e6:.1f} us/msg")
    if args.save:
        profile.dump_stats(args.save)
    report(pstats.Stats(profile), args.top)


if __name__ == "__main__":
    main()
