"""The three quickstart examples of the README, against REDIS_URL (default
redis://localhost:6379/0). Prints what each source emits.

    python examples/quickstart.py
"""

import os
import sys
import time

import redis
from streamz import Stream

URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")


def wait_until(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the example did not finish in time")
        time.sleep(0.01)


def list_example(client):
    client.delete("test-list")
    source = Stream.from_redis_list("test-list")
    results = source.sink_to_list()
    source.start()
    for i in range(5):
        client.rpush("test-list", i)
    wait_until(lambda: len(results) == 5)
    source.stop()
    print("from_redis_list emitted:", results)


def streams_example(client):
    client.delete("test-stream")
    source = Stream.from_redis_streams("test-stream")
    results = source.sink_to_list()
    client.xadd("test-stream", {"i": -1})  # this will not be emitted
    source.start()
    for i in range(5):
        client.xadd("test-stream", {"i": i})
    wait_until(lambda: len(results) == 5)
    source.stop()
    print("from_redis_streams emitted:")
    for entry in results:
        print("   ", entry)


def consumer_group_example(client):
    client.delete("test-stream")
    out = Stream().rate_limit(0.01)
    results = out.sink_to_list()
    consumers = []
    for i in range(3):
        source = Stream.from_redis_consumer_group("test-stream", "test-group", f"consumer-{i}")
        source.connect(out)
        source.start()
        consumers.append(source)
    for i in range(10):
        client.xadd("test-stream", {"i": i})
    wait_until(
        lambda: len(results) == 10
        and client.xpending("test-stream", "test-group")["pending"] == 0
    )
    for source in consumers:
        source.stop()
    print("from_redis_consumer_group emitted (all acknowledged):")
    for entry in results:
        print("   ", entry)


def main():
    client = redis.Redis.from_url(URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        print(
            f"No Redis answers at {URL} ({exc}).\n"
            "Start one with:  redis-server --daemonize yes\n"
            "or point REDIS_URL at yours:  REDIS_URL=redis://host:6379/0 python examples/quickstart.py",
            file=sys.stderr,
        )
        return 1
    with client:
        list_example(client)
        streams_example(client)
        consumer_group_example(client)
    return 0


if __name__ == "__main__":
    sys.exit(main())
