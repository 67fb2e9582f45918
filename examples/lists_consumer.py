"""A queue worker: JSON items from two lists, enriched, out in batches.

    python examples/lists_consumer.py worker-1

Pops JSON objects from the lists "data-source-1" and "data-source-2", adds
to each the name of the list it came from (as "_source"), groups them in
batches of up to 1000 (or whatever arrived in 3 seconds), and pushes each
batch, one JSON object per line, onto the list "preprocessed-data". Redis is
the one at REDIS_URL (default redis://localhost:6379/0). Runs until SIGINT or
SIGTERM.

A plain from_redis_list would lose, in a crash, the items it holds (up to a
whole batch here). So each list is read as a reliable queue: an item moves
to this worker's processing list "<list>:processing:<name>" and leaves it
only once its batch is stored. Kill the worker (even with SIGKILL) and start
it again under the same name: it first emits what its processing lists hold,
so nothing is lost; those items may be written twice. To share the work,
start more workers, each with a name of its own that it keeps across restarts.
"""

import json
import logging
import signal
import sys
import threading

from streamz import Stream

LISTS = ["data-source-1", "data-source-2"]
OUTPUT = "preprocessed-data"


def preprocess(key_and_item):
    key, item = key_and_item
    record = json.loads(item)
    record["_source"] = key
    return json.dumps(record)


def wait_for_a_signal():
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())
    stop.wait()


def main(name):
    # A processing list takes items from one list only: one source per list,
    # joined into one pipeline.
    sources = [
        Stream.from_redis_list(key, processing_list=f"{key}:processing:{name}", with_key=True)
        for key in LISTS
    ]
    sink = (
        Stream.union(*sources)
        .map(preprocess)
        .partition(1000, timeout=3)
        .map("\n".join)
        .to_redis_list(OUTPUT)
    )
    for source in sources:
        source.start()
    print(f"{name}: reading {', '.join(LISTS)}", flush=True)
    wait_for_a_signal()
    # Items still held by partition stay in the processing lists, and are
    # emitted first on the next start under this name.
    for source in sources:
        source.stop()
    sink.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python lists_consumer.py WORKER-NAME")
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1])
