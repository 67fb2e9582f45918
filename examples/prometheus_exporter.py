"""Serve the figures of a consumer-group worker for Prometheus.

    pip install ".[prometheus]"
    python examples/prometheus_exporter.py orders billing worker-1 --port 9108

reads STREAM as CONSUMER of GROUP at REDIS_URL (default
redis://localhost:6379/0), processes each entry (here: nothing), and serves
``source.metrics()`` at http://localhost:PORT/metrics, read at each scrape:

    streamz_redis_source_read_total{stream="orders",group="billing",consumer="worker-1"} 1523.0
    streamz_redis_source_lag{...} 0.0
    streamz_redis_source_oldest_in_flight_seconds{...} 0.002

Counts since the start are counters (``_total``), the rest gauges; a figure
that is not known yet (``lag`` before the first answer) is left out. Stops on
Ctrl-C (SIGINT) or SIGTERM.
"""

import argparse
import signal
import threading

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from streamz import Stream

import streamz_redis  # noqa: F401 - registers the nodes where the package is not installed

COUNTERS = ("read", "emitted", "failed", "acked", "reconnects", "dead_lettered", "trimmed")
HELP = {
    "read": "Entries read from Redis",
    "emitted": "Entries emitted downstream",
    "failed": "Entries whose processing raised",
    "acked": "Acknowledgements Redis confirmed",
    "reconnects": "Connections to Redis lost while reading",
    "dead_lettered": "Entries moved to the dead-letter stream",
    "trimmed": "Entries trimmed from the streams",
    "in_flight": "Entries emitted and not yet done",
    "oldest_in_flight_seconds": "Age of the oldest entry still in the pipeline",
    "lag": "Entries of the group not yet delivered to any consumer",
    "pending": "Entries delivered to this consumer and not yet acknowledged",
}


class SourceFigures:
    """A Prometheus collector: the figures of one source, read at each scrape."""

    def __init__(self, source, labels):
        self.source = source
        self.labels = labels

    def collect(self):
        names, values = list(self.labels), list(self.labels.values())
        for name, value in self.source.metrics().items():
            if value is None:
                continue  # not known yet: absent rather than a made-up zero
            kind = CounterMetricFamily if name in COUNTERS else GaugeMetricFamily
            family = kind(f"streamz_redis_source_{name}", HELP.get(name, name), labels=names)
            family.add_metric(values, value)
            yield family


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stream")
    parser.add_argument("group")
    parser.add_argument("consumer")
    parser.add_argument("--port", type=int, default=9108)
    args = parser.parse_args()

    source = Stream.from_redis_consumer_group(
        args.stream, args.group, args.consumer, trim_acknowledged=True
    )
    source.sink(lambda entry: None)  # your processing here
    REGISTRY.register(SourceFigures(
        source, {"stream": args.stream, "group": args.group, "consumer": args.consumer}
    ))
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
