"""Serve the figures of a consumer-group worker, its source and its sink, for Prometheus.

    pip install ".[prometheus]"
    python examples/prometheus_exporter.py orders billing worker-1 --out invoices --port 9108

reads STREAM as CONSUMER of GROUP at REDIS_URL (default
redis://localhost:6379/0), processes each entry (here: it copies the entry's
id into a field), writes the results to the stream given by ``--out`` (if
any), and serves ``source.metrics()`` and ``sink.metrics()`` at
http://localhost:PORT/metrics, read at each scrape:

    streamz_redis_source_read_total{stream="orders",group="billing",consumer="worker-1"} 1523.0
    streamz_redis_source_lag{...} 0.0
    streamz_redis_source_oldest_in_flight_seconds{...} 0.002
    streamz_redis_sink_written_total{stream="invoices"} 1523.0
    streamz_redis_sink_in_flight{stream="invoices"} 0.0

Counts since the start are counters (``_total``), the rest gauges; a figure
that is not known yet (``lag`` before the first answer) is left out. The
source trims acknowledged entries from its stream only with
``--trim-acknowledged`` (it deletes entries every group has acknowledged: do
not turn it on for a stream other readers still need). Stops on Ctrl-C
(SIGINT) or SIGTERM.
"""

import argparse
import signal
import threading

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from streamz import Stream

import streamz_redis  # noqa: F401 - registers the nodes where the package is not installed

# The figures that count since the node was made; every other figure is a gauge.
COUNTERS = {"read", "emitted", "failed", "acked", "reconnects", "dead_lettered", "trimmed",
            "removed_consumers", "claimed", "written"}
HELP = {
    "read": "Entries read from Redis",
    "emitted": "Entries emitted downstream",
    "failed": "Entries whose processing raised (source), or writes Redis refused (sink)",
    "acked": "Acknowledgements Redis confirmed",
    "reconnects": "Connections to Redis lost while reading",
    "dead_lettered": "Entries moved to the dead-letter stream",
    "trimmed": "Entries trimmed from the streams",
    "removed_consumers": "Idle consumers removed from the group",
    "in_flight": "Entries emitted and not yet done (source), elements not yet confirmed (sink)",
    "oldest_in_flight_seconds": "Age of the oldest entry still in the pipeline",
    "lag": "Entries of the group not yet delivered to any consumer",
    "pending": "Entries delivered to this consumer and not yet acknowledged",
    "written": "Elements Redis stored",
    "writing": "Elements of the round trip under way",
}


class Figures:
    """A Prometheus collector: the figures of one node (``kind`` is "source"
    or "sink"), read at each scrape."""

    def __init__(self, node, kind, labels):
        self.node = node
        self.kind = kind
        self.labels = labels

    def collect(self):
        names, values = list(self.labels), list(self.labels.values())
        for name, value in self.node.metrics().items():
            if value is None or isinstance(value, bool):
                continue  # not known yet: absent rather than a made-up zero
            family = (CounterMetricFamily if name in COUNTERS else GaugeMetricFamily)(
                f"streamz_redis_{self.kind}_{name}", HELP.get(name, name), labels=names)
            family.add_metric(values, value)
            yield family


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stream")
    parser.add_argument("group")
    parser.add_argument("consumer")
    parser.add_argument("--out", help="the stream the results are written to (none: not written)")
    parser.add_argument("--trim-acknowledged", action="store_true",
                        help="trim entries every group has acknowledged from STREAM")
    parser.add_argument("--port", type=int, default=9108)
    args = parser.parse_args()

    source = Stream.from_redis_consumer_group(
        args.stream, args.group, args.consumer, trim_acknowledged=args.trim_acknowledged
    )
    results = source.map(lambda entry: {"entry": entry.id})  # your processing here
    REGISTRY.register(Figures(
        source, "source", {"stream": args.stream, "group": args.group, "consumer": args.consumer}
    ))
    if args.out:
        sink = results.to_redis_stream(args.out)
        REGISTRY.register(Figures(sink, "sink", {"stream": args.out}))
    else:
        results.sink(lambda result: None)
    source.start()
    start_http_server(args.port)
    print(f"serving the figures at http://localhost:{args.port}/metrics", flush=True)

    stopping = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: stopping.set())
    stopping.wait()
    source.stop()


if __name__ == "__main__":
    main()
