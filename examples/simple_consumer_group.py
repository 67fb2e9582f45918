"""A worker of a consumer group: two streams in, batches of JSON lines out.

    python examples/simple_consumer_group.py worker-1

Reads the streams "source-stream-1" and "source-stream-2" as the consumer
named on the command line of the group "my-group", turns each entry into a
JSON record that says where it came from, groups the records in batches of up
to 1000 (or whatever arrived in 3 seconds), and pushes each batch, one record
per line, onto the list "preprocessed-data". Redis is the one at REDIS_URL
(default redis://localhost:6379/0). Runs until SIGINT or SIGTERM.

Each entry is acknowledged only once its batch is stored. Kill the worker
(even with SIGKILL) and start it again under the same name: it first gets
back the entries it had read and not finished, so nothing is lost; those
entries may be written twice. To share the work, start more workers, each
with a name of its own that it keeps across restarts.
"""

import json
import logging
import signal
import sys
import threading

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


def main(name):
    # start_id="0": a group created now starts at the beginning of each
    # stream, so entries added before the first worker ever ran are processed.
    source = Stream.from_redis_consumer_group(STREAMS, GROUP, name, start_id="0")
    sink = (
        source.map(preprocess)
        .partition(1000, timeout=3)
        .map("\n".join)
        .to_redis_list(OUTPUT)
    )
    source.start()
    print(f"{name}: reading {', '.join(STREAMS)} as a consumer of {GROUP!r}", flush=True)
    wait_for_a_signal()
    # Entries still held by partition stay pending, and come back on the
    # next start under this name.
    source.stop()
    sink.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python simple_consumer_group.py CONSUMER-NAME")
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1])
