"""A consumer-group worker whose name changes on every start.

    python examples/dynamic_consumer_group.py [--claim-idle SECONDS] [--remove-idle SECONDS]

Does what simple_consumer_group.py does, for deployments that cannot give a
worker a stable name (replicas that come and go): the consumer name is new on
every start, so a worker that dies never comes back for its pending entries.
Instead, every worker takes over the entries that have been pending for
longer than --claim-idle seconds (default 30) in any consumer of the group,
a dead one included, and processes them. --claim-idle must exceed the longest
an entry can take to leave the pipeline (here partition's 3 seconds plus the
write), or entries still being processed by a live worker are taken over and
processed twice.

So that the group does not collect the names of workers that are gone,
every worker removes from the group the consumers idle for longer than
--remove-idle seconds (default 600) that hold nothing pending, a killed
worker's name once its entries were claimed; and on SIGINT or SIGTERM a
worker that holds no pending entry removes its own name at once (XGROUP
DELCONSUMER). Never delete a consumer that holds entries: its pending
entries would be dropped from the group for good.
"""

import argparse
import json
import logging
import os
import signal
import threading
import uuid

import redis
from streamz import Stream

STREAMS = ["source-stream-1", "source-stream-2"]
GROUP = "my-group"
OUTPUT = "preprocessed-data"


def preprocess(entry):
    stream, entry_id, fields = entry
    return json.dumps({**fields, "_source": stream, "_id": entry_id})


def wait_for_a_signal():
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())
    stop.wait()


def leave_the_group_if_done(name):
    url = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    with redis.Redis.from_url(url) as client:
        held = sum(
            len(client.xpending_range(stream, GROUP, "-", "+", 1, consumername=name))
            for stream in STREAMS
        )
        if held:
            print(f"{name}: {held}+ entries pending; left for --claim-idle to take over")
            return
        for stream in STREAMS:
            client.xgroup_delconsumer(stream, GROUP, name)


def main(claim_idle, remove_idle):
    name = f"worker-{uuid.uuid4()}"
    source = Stream.from_redis_consumer_group(
        STREAMS, GROUP, name, start_id="0",
        claim_idle=claim_idle, remove_idle_consumers=remove_idle,
    )
    sink = (
        source.map(preprocess)
        .partition(1000, timeout=3)
        .map("\n".join)
        .to_redis_list(OUTPUT)
    )
    source.start()
    print(f"{name}: reading {', '.join(STREAMS)} as a consumer of {GROUP!r}", flush=True)
    wait_for_a_signal()
    source.stop()
    sink.close()
    leave_the_group_if_done(name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claim-idle", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument("--remove-idle", type=float, default=600.0, metavar="SECONDS")
    logging.basicConfig(level=logging.WARNING)
    arguments = parser.parse_args()
    main(arguments.claim_idle, arguments.remove_idle)
