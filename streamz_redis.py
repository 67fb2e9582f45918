"""Redis sources and sinks for streamz.

The nodes are registered on ``Stream`` (and through streamz's
``streamz.sources`` and ``streamz.sinks`` entry points, so ``from streamz
import Stream`` is enough).

Sources:

``Stream.from_redis_list(keys)``
    Pops items from the head of one or more Redis lists and emits each item.
    At-most-once: an item popped and lost in a crash is gone. With
    ``processing_list``, a reliable queue: at-least-once.
``Stream.from_redis_streams(streams)``
    Reads one or more Redis Streams with XREAD from a start id and emits an
    ``Entry(stream, id, fields)`` per entry. Nothing is consumed:
    ``source.last_ids`` tells where to resume.
``Stream.from_redis_consumer_group(streams, group, consumer)``
    Reads as one consumer of a consumer group (XREADGROUP) and emits the same
    ``Entry``, with ``entry.deliveries``. At-least-once: an entry is
    acknowledged (XACK) only once it has left the whole pipeline;
    unacknowledged entries come back when a consumer of the same name starts
    again. ``claim_idle`` takes over entries of dead consumers;
    ``max_deliveries`` sends poison entries to a dead-letter stream.
``Stream.from_redis_pubsub(channels, patterns=...)``
    Subscribes to Pub/Sub channels and emits ``Message(channel, data,
    pattern)``. At-most-once, as Pub/Sub itself.

Sinks, ``stream.to_redis_stream(name)``, ``stream.to_redis_list(key)`` and
``stream.to_redis_pubsub(channel)``, and for keys ``to_redis_hash``,
``to_redis_key``, ``to_redis_sorted_set`` and ``to_redis_set`` (with
``ttl=``, and ``increment=True`` for counters) and ``to_redis_command`` for
any other write, pipeline their writes and hold each element's streamz
reference until Redis has confirmed the write, so that an upstream
consumer-group entry is acknowledged only once its result is stored.

This file is the whole of what one server needs; it can be vendored alone.
Three optional modules beside it are imported only when an option asks for
them: ``streamz_redis_cluster`` (``cluster=True`` or a ``RedisCluster``
client), ``streamz_redis_exactly_once`` (``exactly_once=True``) and
``streamz_redis_operations`` (``trim_acknowledged``,
``remove_idle_consumers``, and ``python -m streamz_redis``).

The sections, in dependency order (nothing refers to a later one):

1. Tunables: every deadline, interval and limit.
2. Values: ``Entry`` and ``Message``.
3. The reply boundary: every Redis reply becomes a Python value there.
4. Checking arguments, and URLs without passwords.
5. Optional modules, and the topology of one server (the seam a Redis
   Cluster replaces).
6. The transport: back-off, and the connection a source's blocking reads
   run on (``_Wire``), the one place that uses redis-py's wire-level API.
7. Acknowledgement: the streamz references a source emits, and the ledger,
   the one writer of acknowledgement state.
8. The shared lifecycle: nodes, the registry that finishes them at exit, and
   the source base (``_RedisSource``): start, stop, the read-and-emit loop.
9. The sources.
10. The sinks: the sink base with its write plan (the seam exactly-once
    replaces), the stream, list and Pub/Sub sinks, and the sinks of keys.
11. The command line, handed over to ``streamz_redis_operations``.
"""

import asyncio
import atexit
import codecs
import functools
import importlib
import inspect
import logging
import math
import numbers
import os
import random
import re
import signal
import ssl
import sys
import threading
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Mapping
from operator import methodcaller
from typing import Any, Awaitable, Callable, Dict, List, NamedTuple, Optional, Union
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio
import redis.asyncio.sentinel
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.utils import HIREDIS_AVAILABLE
from streamz import RefCounter, Stream
import streamz.core
from streamz.core import _io_loops as _streamz_io_loops  # no public way to reset it
from streamz.core import sync, thread_state
from streamz.sinks import Sink
from streamz.sources import Source

__all__ = [
    "Entry",
    "Message",
    "from_redis_consumer_group",
    "from_redis_list",
    "from_redis_pubsub",
    "from_redis_streams",
    "to_redis_command",
    "to_redis_hash",
    "to_redis_key",
    "to_redis_list",
    "to_redis_pubsub",
    "to_redis_set",
    "to_redis_sorted_set",
    "to_redis_stream",
]

__version__ = "0.2.0"  # the distribution's version (pyproject.toml)

log = logging.getLogger("streamz_redis")


# --------------------------------------------------------------------------
# 1. Tunables (seconds, as everywhere in the public API)
# --------------------------------------------------------------------------

DEFAULT_URL = "redis://localhost:6379/0"

# Back-off between attempts to reach a Redis that went away or refuses: the
# read loop, the acknowledgement flusher and the sinks.
BACKOFF_FIRST = 0.1
BACKOFF_CAP = 5.0
# Each wait is its delay less up to this share of it, at random ("equal
# jitter"): a thousand consumers that lost one server do not all reconnect
# at the same instant.
BACKOFF_JITTER = 0.5

# stop() wakes a blocking read with CLIENT UNBLOCK; a read that Redis does not
# answer within this long (a hung server) is cancelled.
READ_STOP_DEADLINE = 0.5

# stop() gives an entry mid-way through the pipeline this long to leave it
# before abandoning it (unacknowledged; the rest of its batch given back).
EMIT_STOP_DEADLINE = 5.0

# While a read's entries are emitted, the stream, consumer-group and list
# sources already have their next read on the wire (one read ahead, never
# more): Redis's work and the round trip overlap with the pipeline's. What a
# read ahead brought and stop() finds unemitted is given back as the rest of
# a read is. False: each read is sent once the one before it is emitted.
READ_AHEAD = True

# stop() gives the Redis sinks downstream this long to write what they hold,
# then the acknowledgement ledger as long again to send its last acks; close()
# of a sink waits as long by default. So stop() takes at most about
# READ_STOP_DEADLINE + EMIT_STOP_DEADLINE + 2 * FLUSH_DEADLINE.
FLUSH_DEADLINE = 5.0

# When Python exits, stopping every source and closing every sink takes at
# most this long altogether: what cannot be flushed by then is logged.
EXIT_DEADLINE = 2.0

# SIGTERM (docker stop, Kubernetes) ends a process at once by default, before
# any acknowledgement is flushed. While this is True, a start() in streamz's
# default mode, from the main thread of a process whose SIGTERM is untouched
# (SIG_DFL), makes SIGTERM exit as Ctrl-C does: SystemExit(143), so that the
# sources stop and flush at exit. A handler the application installed is never
# replaced; inside an event loop of your own, use loop.add_signal_handler.
STOP_ON_SIGTERM = True

# Redis checks the timeouts of blocked clients on its cron tick (hz 10 by
# default): when nothing else wakes it, a blocking read that timed out is
# answered up to this long after its BLOCK ran out.
REDIS_TICK = 0.1

# How long one read of a Pub/Sub connection waits for a message. A Pub/Sub
# read cannot be woken with CLIENT UNBLOCK, so it waits in short steps that
# let stop() return within READ_STOP_DEADLINE.
PUBSUB_POLL = 0.1

# How long start() of a Pub/Sub source waits for Redis to confirm the
# subscriptions.
SUBSCRIBE_DEADLINE = 5.0

# How often, at most, a consumer group asks Redis for its lag and pending
# count (and tidies, with trim_acknowledged): after a read, beside the loop.
FIGURES_EVERY = 1.0

# Where Redis does not say how far behind a group is (Redis 6.2 has no "lag";
# Redis 7 has none after some deletions), the entries after its
# last-delivered-id are counted, up to this many; beyond it the lag is None.
LAG_COUNT_LIMIT = 10_000

# A consumer group's blocking connections are named CLIENT_NAME_PREFIX +
# "<group>/<consumer>/<stream>,..." (percent-encoded), so that others can
# tell it alive (see _ConsumerNames).
CLIENT_NAME_PREFIX = "streamz-redis/"

# How many elements a sink holds, received and not yet confirmed by Redis,
# before it makes the upstream wait.
MAX_IN_FLIGHT = 1000

# A source that acknowledges warns, at most once per this many seconds, while
# its oldest entry in flight was read longer ago than this and has still not
# left the pipeline (a wedged node downstream, a dead Dask scheduler). None:
# never.
STUCK_AFTER = 60.0


# --------------------------------------------------------------------------
# 2. Values
# --------------------------------------------------------------------------


class _EntryTuple(NamedTuple):
    stream: str
    id: str
    fields: dict


class Entry(_EntryTuple):
    """One entry of a Redis Stream, as emitted by the stream sources.

    It unpacks as ``stream, id, fields = entry``, a named tuple.

    Parameters
    ----------
    stream : str
        The stream the entry was read from.
    id : str
        The entry's id, ``"<ms>-<seq>"``.
    fields : dict
        The entry's fields, decoded to ``str`` unless the source was made
        with ``decode=False``.

    Attributes
    ----------
    deliveries : int or None
        How many times Redis has delivered the entry to the consumer group
        (1 for a first delivery, more for a replayed or claimed one), or
        ``None`` from ``from_redis_streams``.
    """

    deliveries = None  # set on each entry of a consumer group (the instance's __dict__)

    def __repr__(self):
        text = f"Entry(stream={self.stream!r}, id={self.id!r}, fields={self.fields!r}"
        return text + (")" if self.deliveries is None else f", deliveries={self.deliveries})")


class _FirstDelivery(Entry):
    """An Entry on its first delivery: one without an attribute dict of its
    own, as most entries of a consumer group are."""

    __slots__ = ()
    deliveries = 1  # type: ignore[assignment]  # an int where Entry has None


_new_tuple = tuple.__new__  # _new_tuple(Entry, (...)): an Entry without NamedTuple's __new__


class Message(NamedTuple):
    """One Pub/Sub message, as emitted by ``from_redis_pubsub``.

    A named tuple: ``channel, data, pattern = message``.

    Parameters
    ----------
    channel : str
        The channel it was published to.
    data : str or bytes
        The payload, decoded to ``str`` unless the source was made with
        ``decode=False``.
    pattern : str, optional
        The pattern that matched, for a subscription by pattern, else
        ``None``.
    """

    channel: str
    data: Any
    pattern: Optional[str] = None


# --------------------------------------------------------------------------
# 3. The reply boundary: every Redis reply becomes a Python value here
# --------------------------------------------------------------------------

_STREAM_ID = re.compile(r"(\d+)(?:-(\d+))?")
_UINT64_MAX = 2**64 - 1

# Read on the source's own connection with redis-py's parsing turned off:
# building a dict per entry that we then rebuild costs more than the read.
RAW_REPLY_COMMANDS = ("XREAD", "XREADGROUP", "XAUTOCLAIM")
NEVER_DECODE = {"NEVER_DECODE": True}  # redis.client.NEVER_DECODE: bytes, whatever the client decodes


def _text(value):
    """A key, id or stream name from Redis, as ``str``."""
    return value.decode() if isinstance(value, bytes) else value


def _decoded(value, encoding):
    """A list item or message from Redis, decoded with ``encoding`` (``None``:
    as it is). A client made with ``decode_responses`` hands us ``str``."""
    if encoding is None or not isinstance(value, bytes):
        return value
    return value.decode(encoding)


def _raw_reply(response, **options):
    """A response callback that leaves the reply as Redis sent it, for the
    commands whose replies the helpers below read."""
    return response


def _stream_replies(reply):
    """A raw XREAD or XREADGROUP reply (a map in RESP3, a list of pairs in
    RESP2, nil when nothing came) as ``[(stream, [[id, flat], ...]), ...]``
    with ``str`` names, leaving out streams that had nothing; ids are bytes
    and ``flat`` is the entry's ``[field, value, ...]``, as Redis sent them
    (the XREAD source decodes the ids as it builds each entry: one pass)."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    return [(_text(name), entries) for name, entries in pairs if entries]


def _stream_entries(reply):
    """``_stream_replies`` with ``str`` ids: ``[(stream, [(id, flat), ...]), ...]``."""
    return [
        (name, [(raw_id.decode(), flat) for raw_id, flat in entries])
        for name, entries in _stream_replies(reply)
    ]


def _autoclaimed(reply):
    """A raw XAUTOCLAIM reply as ``(next cursor, [(id, flat), ...], ids of
    pending entries no longer in the stream)``; the last is Redis 7's. Redis
    6.2 answers such an entry with a nil in its place (it is left out here:
    claimed, it is pending under this consumer, and acknowledged without
    being emitted when this consumer replays its pending entries)."""
    entries = [(entry[0].decode(), entry[1]) for entry in reply[1]
               if entry is not None and entry[0] is not None]
    deleted = [_text(i) for i in reply[2]] if len(reply) > 2 else []
    return _text(reply[0]), entries, deleted


def _delivery_counts(rows):
    """XPENDING rows (as redis-py parses them) as ``{id: times delivered}``."""
    return {_text(row["message_id"]): row["times_delivered"] for row in rows}


def _field_decoder(encoding):
    """A function of an entry's flat ``[field, value, ...]`` that iterates
    over it decoded with ``encoding`` (``None``: bytes as they are)."""
    if encoding is None:
        return iter
    if encoding == "utf-8":
        return functools.partial(map, bytes.decode)  # twice as fast as a comprehension
    return functools.partial(map, methodcaller("decode", encoding))


def _entry_fields(flat, encoding):
    """The fields of a stream entry from Redis's flat ``[field, value, ...]``,
    decoded with ``encoding`` (``None``: bytes as they are). ``None`` if Redis
    had none: it answers nil fields for a pending entry that was deleted or
    trimmed from the stream since it was delivered."""
    if not flat:
        return None
    pairs = _field_decoder(encoding)(flat)
    return dict(zip(pairs, pairs))


def _pubsub_message(reply, encoding):
    """A pub/sub reply as a ``Message``, ``None`` if it is not a message.
    Raises ``UnicodeDecodeError`` if its data cannot be decoded."""
    if reply["type"] not in ("message", "pmessage"):
        return None
    pattern = reply.get("pattern")
    return Message(
        _text(reply["channel"]), _decoded(reply["data"], encoding),
        None if pattern is None else _text(pattern),
    )


def _info_field(info, name):
    """A field of an XINFO reply as redis-py parses it (``str`` keys; bytes
    keys from a raw reply)."""
    return info.get(name, info.get(name.encode()))


def _error_text(exc):
    """An exception as a log line shows it: its type and its message.
    (redis-py 8's ``repr()`` of an error is only a tag.)"""
    message = str(exc)
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and str(cause) and str(cause) not in message:
        message = f"{message} ({cause})"  # older redis-py hide an SSL error's words there
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# Errors that mean "Redis is not reachable right now": retried, never fatal.
CONNECTION_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)

# Replies that mean a connection reached a server that no longer serves its
# keys as primary: a failover demoted it (READONLY; UNBLOCKED ends the reads it
# had blocked), or Redis Cluster moved the slot or is moving it (MOVED, ASK,
# TRYAGAIN, CLUSTERDOWN). Reading reconnects through the pool, as for a lost
# connection. (redis-py's Sentinel connection already turns READONLY into a
# ConnectionError: "The previous master is now a slave".)
WRONG_SERVER_ERRORS = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.AskError,  # and MovedError
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)


def _on_wrong_server(exc):
    return isinstance(exc, WRONG_SERVER_ERRORS) or (
        isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith("UNBLOCKED")
    )


def _reconnect_after(exc):
    """Whether a failed command means its connection must be opened anew."""
    return isinstance(exc, CONNECTION_ERRORS) or _on_wrong_server(exc)


def _cannot_be_retried(exc):
    """Connection errors that a retry cannot mend: a wrong password, a
    missing permission, a certificate that does not verify."""
    if isinstance(exc, (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)):
        return True
    while exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# --------------------------------------------------------------------------
# 4. Checking arguments: a clear error naming the parameter, when a node is
#    made; URLs without their passwords
# --------------------------------------------------------------------------


def _check_start_id(start_id, parameter="start_id"):
    """Return ``start_id`` as ``str``, or raise ``ValueError`` naming it.
    An ``int`` is its milliseconds (``0`` is ``"0"``), as the original
    streamz_redis took it."""
    if isinstance(start_id, int) and not isinstance(start_id, bool):
        start_id = str(start_id)
    elif isinstance(start_id, bytes):
        start_id = start_id.decode("ascii", "replace")
    match = _STREAM_ID.fullmatch(start_id) if isinstance(start_id, str) else None
    if start_id != "$" and not (
        match and all(int(part or 0) <= _UINT64_MAX for part in match.groups())
    ):
        raise ValueError(
            f"{parameter}: malformed stream id {start_id!r}: expected '$', '0', "
            "'<milliseconds>' or '<milliseconds>-<sequence>' (each at most 2**64 - 1)"
        )
    return start_id


def _id_before(entry_id):
    """The greatest stream id below ``entry_id``: XREAD from it returns
    ``entry_id`` first."""
    ms, _, seq = entry_id.partition("-")
    if int(seq or 0) > 0:
        return f"{ms}-{int(seq) - 1}"
    return f"{int(ms) - 1}-{_UINT64_MAX}" if int(ms) > 0 else "0-0"


def _id_order(entry_id):
    """A stream id as ``(milliseconds, sequence)``, to compare ids."""
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _encoding_of(decode):
    """The encoding a source decodes values with: ``decode`` is True (UTF-8),
    False (``None``: bytes unchanged) or an encoding name."""
    if decode is False or decode is None:
        return None
    encoding = "utf-8" if decode is True else decode
    if not isinstance(encoding, str):
        raise TypeError(f"decode must be True, False or an encoding name, not {decode!r}")
    "".encode(encoding)  # an unknown encoding, or one that is not for text ("hex"), fails here
    return codecs.lookup(encoding).name  # "UTF8" is "utf-8"


def _seconds(value, parameter, optional=False):
    """A positive, finite number of seconds, or a clear error naming it."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{parameter} must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{parameter} must be a positive, finite number of seconds, not {value!r}")
    return value


def _positive_int(value, parameter, optional=False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{parameter} must be a positive integer, not {value!r}")
    return value


def _name(value, parameter):
    """A key, group, consumer or channel name: non-empty ``str`` or ``bytes``."""
    if not isinstance(value, (str, bytes)) or not value:
        raise TypeError(f"{parameter} must be a non-empty str, not {value!r:.80}")
    return _text(value)


def _optional_name(value, parameter):
    return None if value is None else _name(value, parameter)


def _names(value, parameter):
    """One name or a non-empty list of names, as a list of ``str``."""
    if isinstance(value, (str, bytes)):
        return [_name(value, parameter)]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{parameter} must be a str or a list of str, not {value!r:.80}")
    if not value:
        raise ValueError(f"{parameter}: give at least one name")
    return [_name(v, parameter) for v in value]


def _streams_with_ids(streams, start_id):
    """``streams`` (a name, a list of names or a dict name -> start id) as a
    dict of name -> checked start id."""
    if isinstance(streams, Mapping):
        if not streams:
            raise ValueError("streams: give at least one stream")
        return {_name(k, "streams"): _check_start_id(v, f"streams[{k!r}]") for k, v in streams.items()}
    start_id = _check_start_id(start_id)
    return {name: start_id for name in _names(streams, "streams")}


def _key_name(value, what):
    """A key or channel name (possibly returned by a routing function)."""
    if isinstance(value, (str, bytes)):
        return value
    raise TypeError(f"{what} must be a str or bytes, not {type(value).__name__} ({value!r:.80})")


def _hash_tag(key):
    """The part of ``key`` Redis Cluster hashes: what is inside its first
    ``{...}`` if that is not empty, else the whole key (for the advice of an
    error that names the keys to rename)."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1:end] if start != -1 and end > start + 1 else key


def _safe_url(url):
    """``url`` with any password replaced, fit for reprs, logs and errors.
    Everything between ``://`` and the last ``@`` is the user's: only the
    user name is kept, even where a password holds ``#``, ``/`` or ``?``."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        rest = f"{userinfo.partition(':')[0]}:***@{rest}"
    try:
        parts = urlsplit(scheme + sep + rest)
    except ValueError:
        return scheme + sep + rest
    if "password" in parts.query.lower():  # redis-py also reads ?password=
        query = [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query)]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


def _check_url(url):
    """Raise a clear ``ValueError`` for a URL redis-py would misread; the
    message never holds any part of the password."""
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    try:
        redis.asyncio.connection.parse_url(url)
        valid = True
    except ValueError:
        valid = False  # raised outside: redis-py's error (its __context__) may quote the password
    if not valid:
        raise ValueError(
            f"url {_safe_url(url)!r} is not a valid Redis URL (expected "
            "redis://[[user]:password@]host[:port][/db]); a password that holds "
            "'#', '/', '?', '@' or ':' must be percent-encoded (urllib.parse.quote)"
        )
    parts = urlsplit(url)
    db = parts.path.strip("/")
    if parts.scheme in ("redis", "rediss") and db and not db.isdigit():
        raise ValueError(f"url {_safe_url(url)!r}: the database must be a number, not {db!r}")


# What client= takes: a redis.asyncio client (a Sentinel's master_for() is one)
# or a cluster client.
_AsyncClient = Union[redis.asyncio.Redis, redis.asyncio.RedisCluster]


def _check_client(client):
    if client is not None and not inspect.iscoroutinefunction(getattr(client, "execute_command", None)):
        raise TypeError(
            f"client must be an asyncio client (redis.asyncio.Redis), not "
            f"{type(client).__module__}.{type(client).__name__}"
        )


def _host_port(kwargs):
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


# --------------------------------------------------------------------------
# 5. Optional modules, and the topology of one server
# --------------------------------------------------------------------------


def _optional(module, why):
    """The optional module ``module`` (``streamz_redis_<what>.py``, beside
    this file), imported when ``why`` (an option) first asks for it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name != module:
            raise  # the module is there; something it imports is not
        raise ImportError(
            f"{why} needs {module}.py, which is not installed beside streamz_redis.py "
            f"(it is part of the streamz-redis distribution: pip install streamz-redis, "
            f"or copy {module}.py next to streamz_redis.py)", name=module,
        ) from None


def _topology_for(cluster, client):
    """How a node finds the servers of its keys, chosen once when it is made:
    one server (or a Sentinel service), or a Redis Cluster."""
    if cluster or isinstance(client, redis.asyncio.RedisCluster):
        return _optional("streamz_redis_cluster", "a Redis Cluster").ClusterTopology()
    return _ONE_SERVER


async def _server_identity(client):
    """``(run_id, database)`` of the one server ``client`` talks to."""
    info = await client.info("server")
    return info["run_id"], client.connection_pool.connection_kwargs.get("db", 0)


class _OneServer:
    """The topology of one Redis server, or of a Sentinel service: every key
    is on the server the pooled client reaches. ``streamz_redis_cluster``'s
    ``ClusterTopology`` answers the same questions for a Redis Cluster; no
    other code asks which of the two it has."""

    def new_client(self, url, kwargs):
        return redis.asyncio.from_url(url, **kwargs)

    def describe_url(self, url):
        return _safe_url(url)

    def describe(self, client):
        """How a log line names the server of a ready client, from what the
        client knows (no round trip): its host, port and database, or the
        service a Sentinel client follows with its primary of the moment.
        Passwords are left out."""
        pool = client.connection_pool
        if isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool):
            sentinels = ", ".join(_host_port(s.connection_pool.connection_kwargs)
                                  for s in pool.sentinel_manager.sentinels)
            role = "primary" if pool.is_master else "replica"
            now = f", now {pool.master_address[0]}:{pool.master_address[1]}" if pool.master_address else ""
            return f"Sentinel service {pool.service_name!r} ({role}{now}) via {sentinels}"
        kwargs = pool.connection_kwargs
        scheme = "rediss" if issubclass(pool.connection_class, redis.asyncio.SSLConnection) else "redis"
        if kwargs.get("path"):
            return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
        return f"{scheme}://{_host_port(kwargs)}/{kwargs.get('db', 0)}"

    def key_groups(self, client, keys):
        """The keys one source reads, as the groups one blocking read can
        wait on together: all of them, on one server."""
        return [keys]

    def check_same_slot(self, client, keys, why, advice):
        """A Redis Cluster needs the keys of one command in one slot; one
        server takes any."""

    def slots_apart(self, keys):
        """Why ``keys`` cannot go in one script (on a cluster, their slots),
        or None."""
        return None

    shards_keys = False  # whether keys live on several servers (slots_apart can say no)

    def reader_node(self, pooled, keys):
        """The client whose dedicated connection reads ``keys``."""
        return pooled

    async def forget_node(self, pooled, node, relearn):
        """A reader dropped ``node`` (after an error, when ``relearn``)."""

    async def server_identity(self, client):
        return await _server_identity(client)

    async def pipelined(self, client, commands):
        return await _Wire.pipelined(client, commands)

    publish = pipelined

    def script_preamble(self, script):
        """What a round trip sends before EVALSHA of ``script``: the script
        itself, so that no EVALSHA meets a Redis that lost its scripts."""
        return [(("SCRIPT", "LOAD", script), 0)]

    def script_call(self, script, sha):
        return ("EVALSHA", sha)

    def check_pubsub(self, client, node):
        """Pub/Sub works on any one server."""

    # A source on one server has one blocking connection: its read loop backs
    # off as a whole, up to BACKOFF_CAP.
    slot_backoff_cap = None

    # start() raises at once when the server does not answer.
    start_wait = 0.0


_ONE_SERVER = _OneServer()


# --------------------------------------------------------------------------
# 6. The transport: back-off, and the one place that speaks redis-py's wire
# --------------------------------------------------------------------------


class _Backoff:
    """Capped exponential back-off between retries: ``BACKOFF_FIRST`` seconds,
    doubling up to ``cap`` (``BACKOFF_CAP``), each wait shortened at random by
    up to ``BACKOFF_JITTER`` of it; ``reset()`` after a success. ``delay`` is
    the longest the next wait may be (what log lines say)."""

    def __init__(self, cap=None):
        self.delay = BACKOFF_FIRST
        self.cap = cap

    def reset(self):
        self.delay = BACKOFF_FIRST

    def step(self):
        """The delay to wait now, jittered; the next one doubles."""
        delay, self.delay = self.delay, min(self.delay * 2, self.cap or BACKOFF_CAP)
        return delay * (1 - BACKOFF_JITTER * random.random())

    async def wait(self, stopping=None):
        """Sleep the current delay, or until ``stopping`` (an
        ``asyncio.Event``) is set, and double the next one."""
        delay = self.step()
        if stopping is None:
            await asyncio.sleep(delay)
            return
        try:
            await asyncio.wait_for(stopping.wait(), delay)
        except asyncio.TimeoutError:
            pass


try:  # hiredis >= 2.2.1; without it (or with an older one) the public API is used
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover - CI's benchmark job runs without hiredis
    _pack_command = None  # type: ignore[assignment]

# redis-py < 5.3 requires a command's name in get_connection(); later ones
# deprecate it.
_name_parameter = inspect.signature(redis.asyncio.ConnectionPool.get_connection).parameters.get("command_name")
_GET_CONNECTION_WANTS_A_NAME = _name_parameter is not None and _name_parameter.default is inspect.Parameter.empty


try:  # redis-py's hiredis parser: its reader, and what it says when it needs more bytes
    from redis._parsers.hiredis import _AsyncHiredisParser
    from redis._parsers import hiredis as _hiredis_parsers
    _NOT_ENOUGH_DATA = getattr(_hiredis_parsers, "NOT_ENOUGH_DATA", False)  # redis-py < 6: False
except ImportError:  # pragma: no cover - without hiredis
    _AsyncHiredisParser = None  # type: ignore[assignment,misc]


def _parsed_in_one_go(connection):
    """Whether the replies of a pipeline can be taken from the connection's
    hiredis reader in one loop (RESP2, redis-py's hiredis parser), rather than
    through ``read_response()``, which costs a timeout context and several
    coroutines per reply: a third of a sink's time at 1,000 replies a round
    trip."""
    parser = getattr(connection, "_parser", None)  # redis-py's, through its own attribute names
    return (_AsyncHiredisParser is not None and type(parser) is _AsyncHiredisParser
            and getattr(parser, "_reader", None) is not None
            # RESP3 (redis-py 8's default): only where a push message can be told apart
            and (str(getattr(connection, "protocol", 2) or 2) == "2"
                 or getattr(parser, "_hiredis_PushNotificationType", None) is not None))


if sys.version_info >= (3, 11):
    async def _within(awaitable, timeout):
        """``await awaitable``, raising asyncio.TimeoutError after ``timeout``
        seconds (None: none): without wait_for's task of its own (Python
        3.11), a turn of the loop and a task saved on every read."""
        async with asyncio.timeout(timeout):
            return await awaitable
else:  # pragma: no cover - Python 3.10 has no asyncio.timeout
    _within = asyncio.wait_for


def _send_at_once(connection, packed):
    """Put a packed command on the wire now, on a connected connection's
    asyncio writer; False where it is not connected (redis-py connects it).
    redis-py's send_packed_command() writes inside wait_for, which on Python
    3.11 is a task of its own: the bytes would wait a turn of the loop (a
    read sent ahead would leave only once the batch before it is emitted)."""
    writer = getattr(connection, "_writer", None)  # redis-py's, as its _send_packed_command uses it
    if writer is None or not connection.is_connected:
        return False
    writer.write(packed)  # asyncio sends at once when nothing waits in its buffer
    return True


async def _read_replies(connection, n):
    """``n`` replies from the hiredis reader of ``connection``, reading from
    the socket (within its ``socket_timeout``) only when it needs more bytes.
    A reply Redis refused is its exception, in place; one that means the
    connection is unusable (LOADING, say) raises, as redis-py does."""
    # The one reach into redis-py's privates (its parser's hiredis reader, the
    # attributes its own read_response() uses, in 5.0.2 to 8.x alike), checked
    # by _parsed_in_one_go() first: it makes a sink 1.5 times as fast.
    parser = connection._parser  # noqa: SLF001
    reader, timeout, replies = parser._reader, connection.socket_timeout, []  # noqa: SLF001
    push = getattr(parser, "_hiredis_PushNotificationType", None) or ()
    while len(replies) < n:
        reply = reader.gets()
        if reply is _NOT_ENOUGH_DATA or reply is False:
            if not parser._connected:  # noqa: SLF001
                raise redis.exceptions.ConnectionError("Connection closed by server.")
            try:
                await _within(parser.read_from_socket(), timeout)
            except asyncio.TimeoutError:
                raise redis.exceptions.TimeoutError("Timeout reading from Redis") from None
            continue
        if isinstance(reply, push):  # RESP3: not a reply; redis-py handles it
            await parser.handle_push_response(reply)
            continue
        if isinstance(reply, redis.exceptions.ConnectionError):
            raise reply
        replies.append(reply)
    return replies


class _Wire:
    """The one connection a source's blocking reads run on, and the one class
    that uses redis-py's wire-level API (packed commands, ``read_response``,
    CLIENT ID and UNBLOCK). Where hiredis or its ``pack_command`` is missing,
    the same calls go through redis-py's public API.

    Blocking reads get a connection of their own, so that acknowledgements
    and other commands never wait behind them. Its CLIENT ID is kept (and
    renewed on reconnect) so that ``stop()`` can wake a blocked read with
    CLIENT UNBLOCK from the pooled client: the read returns as if it had timed
    out, so nothing it was about to pop is lost (a cancelled BLPOP can lose
    the item it popped).

    A connection that was lost, or that reached a server which no longer
    serves its keys as primary (``_on_wrong_server``), is dropped, and the
    next read opens a new one from the pool; the topology re-learns who
    serves the keys. redis-py would reconnect it to the address it remembers,
    but after a failover the pool alone knows the new primary: a Sentinel
    pool asks Sentinel.
    """

    def __init__(self, pooled, keys, topology, name=None):
        self.pooled = pooled
        self.keys = keys  # what it reads: on a Redis Cluster, keys of one slot
        self.topology = topology
        self.name = name  # CLIENT SETNAME, where the source has one: who reads
        self.node = pooled  # where CLIENT UNBLOCK goes
        self.read = None  # the read under way, where a source has several connections
        self.backoff = _Backoff(topology.slot_backoff_cap)  # where it has several: its own
        self.retry_at = 0.0  # (loop time) after a failed read, where it has several
        self.client = None
        self.id = None
        self.socket_timeout = None

    async def open(self):
        self.node = self.topology.reader_node(self.pooled, self.keys)
        client = self.node.client()
        for command in RAW_REPLY_COMMANDS:
            client.set_response_callback(command, _raw_reply)
        try:
            await client.initialize()
            client.connection.register_connect_callback(self._on_connect)
            await self._on_connect(client.connection)
        except BaseException:
            await self._discard(client)
            raise
        # The connection's own value: redis-py 8 applies a default of 5 s that
        # the pool's connection_kwargs do not show.
        self.socket_timeout = getattr(client.connection, "socket_timeout", None)
        self.client = client

    async def _on_connect(self, connection):
        await connection.send_command("CLIENT", "ID")
        self.id = await connection.read_response()
        if self.name is not None:
            await connection.send_command("CLIENT", "SETNAME", self.name)
            try:
                await connection.read_response()
            except redis.exceptions.ResponseError:  # not allowed: nobody learns who reads
                self.name = None

    async def others(self):
        """The other connections of this connection's server, as CLIENT LIST
        rows (``name`` as ``str``); None where this user may not list them."""
        try:
            rows = await self.node.client_list()
        except redis.exceptions.ResponseError:
            return None
        for row in rows:
            row["name"] = _text(row.get("name") or "")
        return [row for row in rows if int(row["id"]) != self.id]

    def block_seconds(self, timeout):
        """How long one blocking read may wait on the server, for a source's
        ``timeout``.

        BLOCK must stay below the client's socket_timeout or redis-py raises
        TimeoutError (and drops the connection) while Redis is merely idle.
        An idle Redis answers a timed-out read on its next cron tick, up to
        REDIS_TICK after BLOCK ran out.
        """
        socket_timeout = self.socket_timeout
        if socket_timeout:
            return max(0.01, min(timeout, (socket_timeout - REDIS_TICK) / 2))
        return timeout

    async def refused(self, probes):
        """Which of ``probes`` (command argument lists) this user may not
        run, as ``[(command, error)]``. Each is only queued inside a
        MULTI that is then discarded, so none runs; Redis checks permissions
        as it queues. ``[]`` where MULTI itself is not allowed."""
        connection = self.client.connection
        if not await self._answered(connection, "MULTI"):
            return []  # without MULTI nothing can be checked unrun
        refused = []
        try:
            for args in probes:
                await connection.send_command(*args)
                try:
                    await connection.read_response()
                except redis.exceptions.ResponseError as exc:
                    if str(exc).startswith("NOPERM") or isinstance(exc, redis.exceptions.NoPermissionError):
                        refused.append((args[0], exc))
        finally:
            await self._answered(connection, "DISCARD")
        return refused

    @staticmethod
    async def _answered(connection, command):
        await connection.send_command(command)
        try:
            await connection.read_response()
        except redis.exceptions.ResponseError:
            return False
        return True

    async def execute(self, *args, **options):
        """Run one command on this connection. With hiredis it is packed by
        hiredis and its reply read as Redis sent it (the replies the value
        boundary reads): redis.asyncio's ``execute_command`` costs about 60 us
        more per read (its lock, its retry wrapper, packing in Python). A
        failed read drops the connection."""
        try:
            if self.client is None:
                await self.open()  # dropped after an error: a new one, from the pool
            if _pack_command is None:
                return await self.client.execute_command(*args, **options)
            connection = self.client.connection
            packed = _pack_command(args)
            if not _send_at_once(connection, packed):
                await connection.send_packed_command(packed, check_health=False)
            return await connection.read_response(disable_decoding=True)
        except Exception as exc:
            # Opening fails too when a cluster's master was killed: the
            # topology asks again until the cluster names its replica.
            if _reconnect_after(exc):
                await self._drop()
            raise

    async def _drop(self):
        client, self.client, self.id = self.client, None, None
        if client is not None:
            await self._discard(client)
        node, self.node = self.node, self.pooled
        await self.topology.forget_node(self.pooled, node, relearn=True)

    async def _discard(self, client):
        """Close ``client`` without handing its connection back to the pool
        as it is: it may be on the old primary."""
        try:
            if client.connection is not None:
                client.connection.deregister_connect_callback(self._on_connect)
                await client.connection.disconnect()
            await client.aclose()
        except Exception:  # pragma: no cover - closing a dead socket
            pass

    async def unblock(self):
        if self.id is None:
            return
        # A task of our own whose outcome is always retrieved: given the
        # coroutine, wait_for (Python 3.10, 3.11) would wrap it in a task that
        # nobody retrieves when stop() cancels this one, and that task can end
        # in a ConnectionError instead (stop() closing the pool under it).
        command = asyncio.ensure_future(self.node.execute_command("CLIENT UNBLOCK", self.id))
        command.add_done_callback(_retrieve)
        try:
            await asyncio.wait_for(command, READ_STOP_DEADLINE)
        except Exception:
            pass  # stop() cancels the read after READ_STOP_DEADLINE instead

    async def close(self, cut=False):
        """Close the connection; ``cut``: its reply may be half read."""
        client, self.client, self.id = self.client, None, None
        node, self.node = self.node, self.pooled
        if self.read is not None:
            self.read.cancel()
            self.read = None
        if client is not None:
            if client.connection is not None:
                # With client=, the connection goes back to the user's pool.
                client.connection.deregister_connect_callback(self._on_connect)
                if cut:
                    await client.connection.disconnect()
            await client.aclose()
        await self.topology.forget_node(self.pooled, node, relearn=False)

    @staticmethod
    async def pipelined(client, commands):
        """The replies to ``commands`` (argument tuples), sent in one round
        trip, with an exception in place of each that Redis refused: a
        redis-py pipeline (``transaction=False``, ``raise_on_error=False``),
        packed by hiredis.

        redis.asyncio packs a command argument by argument in Python, about
        2 us each: more than reading the entry an XACK id acknowledges, or
        most of an XADD (redis-py's sync client packs with hiredis). Only for
        commands whose replies need no parsing; where there is no hiredis, a
        single-connection client or another encoding than UTF-8, it is an
        ordinary pipeline."""
        pool = client.connection_pool
        if (
            _pack_command is None or getattr(client, "single_connection_client", False)
            or pool.connection_kwargs.get("encoding", "utf-8").lower() not in ("utf-8", "utf8")
            or pool.connection_kwargs.get("encoding_errors", "strict") != "strict"
        ):  # hiredis encodes str as strict UTF-8
            async with client.pipeline(transaction=False) as pipe:
                for args in commands:
                    pipe.execute_command(*args)
                return await pipe.execute(raise_on_error=False)
        if _GET_CONNECTION_WANTS_A_NAME:
            connection = await pool.get_connection(commands[0][0])
        else:
            connection = await pool.get_connection()
        try:
            await connection.send_packed_command(b"".join([_pack_command(tuple(args)) for args in commands]))
            if _parsed_in_one_go(connection):
                return await _read_replies(connection, len(commands))
            replies = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except redis.exceptions.ResponseError as refused:
                    replies.append(refused)  # the whole reply was read: read on
            return replies
        except BaseException:
            await connection.disconnect()  # a reply may be half read
            raise
        finally:
            await pool.release(connection)


def _raise_refused(replies):
    """``replies`` of a pipeline, raising the first that Redis refused."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


# --------------------------------------------------------------------------
# 7. Acknowledgement by streamz reference counting; the ledger
# --------------------------------------------------------------------------

_PENDING, _DONE, _FAILED, _SETTLED = 0, 1, 2, 3  # _SETTLED: acknowledged by a sink's script


class _Reference(RefCounter):
    """The streamz reference of what a source emitted, and its own callback.

    This is the protocol between sources and sinks: a sink holds the
    references in an element's metadata until Redis has stored the element,
    calls ``fail()`` on each if Redis refused it (the entries are then never
    acknowledged), and names them with ``str()`` in its log lines. What each
    call changes, the ledger changes: it alone writes acknowledgement state.

    It starts with the source's own hold (``count=1``), released once the
    emit's futures are done. streamz's RefCounter calls back, through
    ``loop.add_callback``, on every release that reaches zero; this one acts
    once, and at once when released on the loop's own thread (a loop turn per
    entry saved).
    """

    __slots__ = ("loop", "count", "ledger", "state")

    @property
    def cb(self):
        # Itself, without storing it: a reference to itself would be a cycle,
        # and a reference a node dropped would live on until the garbage
        # collector ran (and a replay would take it for one still held).
        return self

    def release(self, n=1):
        self.count -= n
        if self.count <= 0 and self.state == _PENDING:
            if threading.get_ident() == self.ledger.loop_thread:
                self()
            else:
                self.loop.add_callback(self)


class _Ack(_Reference):
    """One tracked entry (or reliable-list item): acknowledged when the last
    reference to it goes, unless its processing failed."""

    __slots__ = ("key", "item")

    def __init__(self, ledger, key, item):
        # Not RefCounter.__init__ (it would look a loop up): one per entry.
        self.loop = ledger.loop
        self.count = 1
        self.ledger = ledger
        self.state = _PENDING
        self.key = key  # stream name or processing list
        self.item = item  # entry id or raw list item

    def __call__(self):
        if self.state == _PENDING:
            self.ledger.done(self)

    def fail(self):
        if self.state == _PENDING:
            self.ledger.fail(self)

    def settle(self):
        """An exactly-once sink acknowledged the entry in the same script
        that stored its result: the ledger must not acknowledge it again."""
        if self.state == _PENDING:
            self.ledger.settle(self)

    def command(self):
        """The command that acknowledges the entry, as a sink's script runs
        it: ``(command, key, argument, argument)``."""
        return self.ledger.command(self.key, self.item)

    def entries(self):
        return [self]

    def __str__(self):
        if isinstance(self.item, str):
            return f"entry {self.item} of stream {self.key!r}"
        return f"item {self.item[:80]!r} of list {self.key!r}"


class _AckAll(_Reference):
    """A batch emitted as one list (``batch=True``): acknowledged, or failed,
    as a whole. The ledger tracks it as one object; its ``_Ack``s are never
    tracked, referenced or called one by one (only an exactly-once sink
    settles them)."""

    __slots__ = ("acks",)

    def __init__(self, ledger, acks):
        self.loop = ledger.loop
        self.count = 1
        self.ledger = ledger
        self.state = _PENDING
        self.acks = acks

    def __call__(self):
        if self.state == _PENDING:
            self.ledger.done_all(self)

    def fail(self):
        if self.state == _PENDING:
            self.ledger.fail_all(self)

    def entries(self):
        return self.acks

    def __str__(self):
        return f"a batch of {len(self.acks)} from {self.acks[0]} to {self.acks[-1]}"


def _any_pending(refs):
    """Whether any of these weakly held references is still in the pipeline."""
    for ref in refs:
        origin = ref()
        if origin is not None and origin.state == _PENDING:
            return True
    return False


class _AckLedger:
    """Everything a source that acknowledges owes Redis, in one place, and
    the only writer of acknowledgement state.

    ``ack(key, item)`` makes the ``_Ack`` of an entry the source is about to
    emit. Once the last streamz reference to it is released it is queued here;
    one flusher task sends what is queued with ``send({key: [items]})`` (the
    source's XACK or LREM), one call per round trip, batching whatever arrived
    during the last one, with back-off while Redis refuses. A failed ack is
    never sent: its entry stays pending in Redis.

    ``in_flight`` remembers, weakly, the entries somewhere in the pipeline
    (``batches``, the ``batch=True`` reads), so that a replay does not emit
    one twice; an entry whose references a node dropped without releasing
    them is forgotten, and a replay delivers it again. ``held()`` also counts
    acks queued or being sent. Each read is timed (``note_read``), for
    ``oldest_in_flight_seconds``.
    """

    def __init__(self, source, send, command):
        self.source = source
        self.command = command  # (key, item) -> (command, key, argument, argument)
        self.loop = self.loop_thread = None  # the source's event loop and its thread, by open()
        self.send = send
        self.in_flight = {}  # (key, item) -> weakref to its _Ack
        self.batches = weakref.WeakSet()  # the _AckAll of each batch=True read in flight
        self.queued = defaultdict(list)  # key -> items, in order (a list item may repeat)
        self.sending = {}
        self.flusher = None
        self.is_open = False  # connected: flushing may run
        self.stopping = None
        self.acked = 0  # acknowledgements Redis has confirmed
        self.awaiting = None  # the reference whose emit's futures the source awaits
        self.reads = deque()  # (monotonic time, weakrefs to what it emits) per read
        self.reads_compacted_at = 64

    # ---- what the source and the sinks call ----------------------------

    def ack(self, key, item):
        return _Ack(self, key, item)

    def batch(self, acks):
        return _AckAll(self, acks)

    def track(self, ref):
        """``ref`` (an ``_Ack``, or a batch's ``_AckAll``) is being emitted."""
        if ref.__class__ is _Ack:
            self.in_flight[ref.key, ref.item] = weakref.ref(ref)
        else:
            self.batches.add(ref)

    def done(self, ack):
        ack.state = _DONE
        self.forget(ack)
        self.queued[ack.key].append(ack.item)
        self._flush_soon()

    def done_all(self, batch):
        """A ``batch=True`` read left the pipeline: queue its acks at once."""
        batch.state = _DONE
        self.batches.discard(batch)
        queued = self.queued
        for ack in batch.acks:
            if ack.state == _PENDING:  # not settled by an exactly-once sink
                ack.state = _DONE
                queued[ack.key].append(ack.item)
        self._flush_soon()

    def fail(self, ack):
        ack.state = _FAILED
        self.forget(ack)

    def fail_all(self, batch):
        batch.state = _FAILED
        self.batches.discard(batch)
        for ack in batch.acks:
            ack.state = _FAILED

    def settle(self, ack):
        ack.state = _SETTLED
        self.forget(ack)
        self.acked += 1

    def held_only_by_one(self, ref):
        """Whether one node alone (the caller) holds ``ref``, besides the
        source's own hold while it awaits this very emit (back-pressure: it
        lets go as soon as the caller answers)."""
        return ref.count - 1 - (self.awaiting is ref) == 0

    # ---- what is in flight -----------------------------------------------

    def forget(self, ack):
        ref = self.in_flight.get((ack.key, ack.item))
        if ref is not None and ref() in (ack, None):  # not another copy of a list item
            del self.in_flight[ack.key, ack.item]

    def held(self):
        """``(key, item)`` of each entry in the pipeline, or whose ack is not
        yet sent. Forgets entries dropped without a release."""
        in_flight = self.in_flight
        for key in [key for key, ref in in_flight.items() if ref() is None]:
            del in_flight[key]
        held = set(in_flight)
        held.update((a.key, a.item) for b in list(self.batches) if b.state == _PENDING for a in b.acks)
        for acks in (self.queued, self.sending):
            held.update((key, item) for key, items in acks.items() for item in items)
        return held

    def holds_any(self):
        return bool(self.in_flight or self.batches)

    def in_flight_count(self):
        return sum(1 for ref in list(self.in_flight.values()) if ref() is not None) + sum(
            len(b.acks) for b in list(self.batches) if b.state == _PENDING)

    def unsent(self):
        return sum(map(len, self.queued.values())) + sum(map(len, self.sending.values()))

    def note_read(self, refs):
        """A read that emits ``refs`` (weak references to its acks): timed,
        weakly held; reads that left the pipeline are forgotten here."""
        reads = self.reads
        while reads and not _any_pending(reads[0][1]):
            reads.popleft()
        if len(reads) > self.reads_compacted_at:
            # A read held up front (a window, a slow branch) keeps the ones
            # behind it listed: drop those that are done, each time their
            # number doubles.
            self.reads = reads = deque(r for r in reads if _any_pending(r[1]))
            self.reads_compacted_at = max(64, 2 * len(reads))
        reads.append((time.monotonic(), refs))

    def oldest_in_flight_seconds(self):
        """Age of the oldest read that still has an entry in the pipeline.
        Reads are timed, not entries: the per-entry path stays as it was."""
        for read_at, refs in list(self.reads):
            if _any_pending(refs):
                return time.monotonic() - read_at
        return 0.0

    # ---- sending -------------------------------------------------------

    def _flush_soon(self):
        if self.is_open and (self.flusher is None or self.flusher.done()):
            self.flusher = asyncio.ensure_future(self._flush())

    def open(self, stopping):
        """Called by ``start()`` once connected: acks left from before a
        ``stop()`` are sent now."""
        self.loop = self.source.loop
        self.loop_thread = threading.get_ident()
        self.stopping = stopping
        self.is_open = True
        if any(self.queued.values()):
            self.flusher = asyncio.ensure_future(self._flush())

    async def _flush(self):
        backoff = _Backoff()
        while self.is_open and any(self.queued.values()):
            self.sending, self.queued = self.queued, defaultdict(list)
            try:
                await self.send({key: items for key, items in self.sending.items() if items})
                self.acked += sum(map(len, self.sending.values()))
                backoff.reset()
            except BaseException as exc:
                for key, items in self.sending.items():
                    self.queued[key][:0] = items
                if not isinstance(exc, Exception):
                    raise  # cancelled by close(): the acks stay queued
                if self.stopping.is_set():
                    return  # close() says how many are left
                # A lost connection is a warning; anything else (READONLY
                # during a failover, NOGROUP, NOPERM) an error. Both retried.
                level = logging.WARNING if isinstance(exc, CONNECTION_ERRORS) else logging.ERROR
                log.log(level, "%s: acknowledgement failed (%s); retrying in %.1f s",
                        self.source, _error_text(exc), backoff.delay)
                await backoff.wait(self.stopping)
            finally:
                self.sending = {}

    async def drained(self):
        """Wait until what is queued now has been sent (or given up)."""
        if self.flusher is not None:
            await asyncio.shield(self.flusher)

    async def close(self, timeout):
        """The final flush, waiting at most ``timeout`` seconds; then no more
        until ``open()``. Returns how many acks were left unsent."""
        if any(self.queued.values()) and (self.flusher is None or self.flusher.done()):
            self.flusher = asyncio.ensure_future(self._flush())
        if self.flusher is not None:
            await asyncio.wait([self.flusher], timeout=timeout)
        self.is_open = False
        if self.flusher is not None and not self.flusher.done():
            self.flusher.cancel()
            await asyncio.wait([self.flusher])
        return self.unsent()


# --------------------------------------------------------------------------
# 8. The shared lifecycle: nodes, exit, the source base
# --------------------------------------------------------------------------

# Every source that runs and every sink that holds a connection, so that
# Python's exit finishes them: sources first (their sinks write what the
# sources flush), then sinks.
_live_nodes: "weakref.WeakSet[_RedisNode]" = weakref.WeakSet()
_hiredis_checked = False


def _after_fork_in_child():
    """streamz runs its event loop in one thread it keeps in a module-level
    list; a forked child has that loop object without its thread, and
    anything waiting on it would block forever. The child gets a loop of its
    own for the nodes it makes; the parent's nodes are the parent's (their
    start() in the child says so at once, and exit leaves them alone)."""
    _streamz_io_loops.clear()
    _live_nodes.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _exit_cleanly():
    """When Python exits: finish every live node (stop the sources, flushing
    their acknowledgements; then close the sinks), within EXIT_DEADLINE
    altogether even if Redis does not answer."""
    end = time.monotonic() + EXIT_DEADLINE
    for node in sorted(list(_live_nodes), key=lambda node: node.exit_order):
        try:
            node.finish_at_exit(end - time.monotonic())
        except Exception as exc:  # pragma: no cover - best effort at exit
            log.error("%s: could not finish cleanly at exit (%s)", node, _error_text(exc))


def _below(node, every_path=False, direction="downstreams"):
    """The nodes downstream of ``node``, each once (or, with
    ``every_path``, once per path that leads there); with
    ``direction="upstreams"``, those upstream of it. The one walk of the
    streamz graph."""
    seen, todo = set(), list(getattr(node, direction))
    while todo:
        node = todo.pop()
        if node is None or (not every_path and id(node) in seen):
            continue
        seen.add(id(node))
        yield node
        todo.extend(getattr(node, direction))


def _leaves(node):
    """The nodes where ``node``'s elements end, each with the number of
    paths from ``node`` that lead there."""
    leaves = defaultdict(int)
    for below in _below(node, every_path=True):
        if not any(d is not None for d in below.downstreams):
            leaves[below] += 1
    return leaves


class _RedisNode:
    """What every node of this module shares: its connection arguments, its
    topology, how it makes its client, how it runs on its event loop, and how
    it names itself (never with a password)."""

    exit_order = 0  # at exit, sources (0) stop before sinks (1) close
    holds_writes = False  # a sink: what it holds, flush() writes

    def _connection_args(self, url, client_kwargs, client, cluster=False):
        self.made_in_process = os.getpid()
        self.server_given = url is not None or client is not None
        self.url = url or os.environ.get("REDIS_URL") or DEFAULT_URL
        self.cluster = bool(cluster)
        _check_client(client)
        if client is None:
            _check_url(self.url)
        if client_kwargs is not None and not isinstance(client_kwargs, Mapping):
            raise TypeError(f"client_kwargs must be a dict, not {type(client_kwargs).__name__}")
        self.client_kwargs = dict(client_kwargs or {})
        self.client = client
        self.topology = _topology_for(self.cluster, client)

    def _new_client(self):
        """The user's client, or one made from ``url`` and ``client_kwargs``."""
        if self.client is not None:
            return self.client
        kwargs = dict(self.client_kwargs)
        # Our loops retry with back-off and log; redis-py's own silent retries
        # would delay a clear error from start(), or send a pipeline twice.
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        kwargs["decode_responses"] = False  # values are decoded at our boundary
        return self.topology.new_client(self.url, kwargs)

    def __str__(self):
        return f"<{type(self).__name__} {self._describe()} at {self.where()}>"

    __repr__ = __str__

    def _describe(self):  # pragma: no cover - overridden
        return ""

    def where(self) -> str:
        """Where this node's Redis is, for its repr and log lines: a URL, a
        Redis Cluster or a Sentinel service. Never raises, never shows a
        password."""
        try:
            if self.client is None:
                return self.topology.describe_url(self.url)
            return self.topology.describe(self.client)
        except Exception:
            return f"a {type(self.client).__name__} client"

    def _check_process(self):
        """A node made before a fork cannot run in the child: its event loop
        (streamz's thread, or the parent's asyncio loop) is not there."""
        if self.made_in_process != os.getpid():
            raise RuntimeError(
                f"{self} was made in process {self.made_in_process}, and this is process "
                f"{os.getpid()}, forked from it: the event loop it runs on did not survive the "
                "fork. Make the pipeline in the process that runs it (after the fork, or with "
                "multiprocessing's 'spawn' or 'forkserver' start method)")

    def _on_loop_thread(self):
        try:
            return asyncio.get_running_loop() is self.loop.asyncio_loop
        except RuntimeError:
            return False

    def _loop_runs_elsewhere(self):
        """Whether this node's event loop still runs, in another thread: at
        exit, the loop of a finished ``asyncio.run`` would never answer."""
        loop = self.loop.asyncio_loop
        return loop.is_running() and not loop.is_closed() and not self._on_loop_thread()

    def _on_loop(self, coroutine_function, *args):
        """Run a coroutine on the node's event loop from any thread: inside
        the loop, return it as a future to await; elsewhere, block until it
        is done. If that loop has ended (a finished ``asyncio.run``) nothing
        can run: ``_loop_ended()`` says so."""
        self._check_process()
        if self._on_loop_thread():
            return asyncio.ensure_future(coroutine_function(*args))
        if self._loop_runs_elsewhere():
            sync(self.loop, coroutine_function, *args)
        else:
            self._loop_ended()

    def _finish_within(self, left, finish):
        """At exit: run ``finish(left)`` on the loop; False if it cannot run
        (no time or no loop left)."""
        if self._loop_runs_elsewhere() and left > 0:
            sync(self.loop, finish, left, callback_timeout=left + 1)
            return True
        return False


def _exit_on_sigterm(signal_number, frame):
    raise SystemExit(128 + signal_number)


def _stop_on_sigterm():
    """See STOP_ON_SIGTERM. Only the main thread may set a handler."""
    if not STOP_ON_SIGTERM or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
    except (ValueError, OSError):  # pragma: no cover - no signals here (an embedded interpreter)
        pass


def _warn_without_hiredis():
    global _hiredis_checked
    if not _hiredis_checked:
        _hiredis_checked = True
        if not HIREDIS_AVAILABLE:
            log.warning(
                "hiredis is not installed: reading is about 3 to 4.5 times slower "
                "(pip install 'redis[hiredis]')"
            )


def _check_dask_client(source):
    """Refuse to start a pipeline with streamz.dask nodes that cannot run.
    Those nodes use the distributed Client's event loop, and a pipeline
    adopts it only if the Client exists when the pipeline is built (streamz's
    get_io_loop): without a Client, or with one made afterwards, entries are
    read and nothing ever reaches the sink, silently. Nothing here imports
    dask unless the pipeline uses it."""
    if "streamz.dask" not in sys.modules:
        return
    dask_nodes = {type(node).__name__ for node in _below(source) if type(node).__module__ == "streamz.dask"}
    if not dask_nodes:
        return
    from distributed import default_client

    uses = f"the pipeline uses streamz.dask nodes ({', '.join(sorted(dask_nodes))})"
    try:
        client = default_client()
    except ValueError:
        raise RuntimeError(
            f"{source}: {uses} and no Dask client exists; create the distributed "
            f"Client first, then build the pipeline"
        ) from None
    if client.loop is not source.loop:
        raise RuntimeError(
            f"{source}: {uses}, but it was built before the Dask client was created, so it "
            f"runs on another event loop than the client's and would never reach its "
            f"sinks; create the Client first, then build the pipeline"
        )


_STREAMZ_NODES_THAT_LOG = (streamz.core.map, streamz.core.starmap, streamz.core.filter,
                           streamz.core.accumulate)


def _logged_by_streamz(exc):
    """Whether streamz logged ``exc`` already: its ``map``, ``starmap``,
    ``filter`` and ``accumulate`` log what their function raised."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "update" and isinstance(
            frame.f_locals.get("self"), _STREAMZ_NODES_THAT_LOG
        ):
            return True
        tb = tb.tb_next
    return False


def _never_emitted(rest):
    """What a source gives back unemitted is never acknowledged by it, nor
    counted in flight (the frames of a cancelled emit may keep it alive)."""
    for _, origin in rest:
        if isinstance(origin, _Reference):
            origin.fail()


def _being_cancelled():
    """Whether the current task itself is being cancelled (rather than a
    future it awaited). Python 3.10 cannot tell: it says yes."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return cancelling is None or cancelling() > 0


def _name_of(value):
    """How a log line names an emitted value."""
    if isinstance(value, list) and value:
        return f"a batch of {len(value)} from {_name_of(value[0])} to {_name_of(value[-1])}"
    if isinstance(value, Entry):
        return f"entry {value.id} of stream {value.stream!r}"
    text = repr(value)
    return f"item {text[:80]}{'...' if len(text) > 80 else ''}"


def _retrieve(task):
    """A done callback: the task's outcome is taken, and left (a task of our
    own whose result nobody needs)."""
    if not task.cancelled():
        task.exception()


class _Later:
    """A read's reply, to be decoded once the next read is on its way (see
    READ_AHEAD): ``await decode(reply)`` gives its ``(value, origin)``
    pairs. Redis serves the next read while this one is decoded."""

    __slots__ = ("decode", "reply")

    def __init__(self, decode, reply):
        self.decode = decode
        self.reply = reply


class _Readers:
    """A source's blocking connections: one ``_Wire`` per group of keys that
    one blocking read can wait on together (on a Redis Cluster, the keys of
    each slot; elsewhere all of them)."""

    def __init__(self):
        self.wires = []

    @property
    def first(self):
        return self.wires[0] if self.wires else None

    async def open(self, client, topology, keys, name=None):
        self.wires = [_Wire(client, group, topology, name) for group in topology.key_groups(client, keys)]
        for wire in self.wires:
            await wire.open()

    async def refused(self, probes):
        """What ``probes(keys)`` of each connection this user may not run:
        on a cluster, each slot's keys on their own node."""
        refused = []
        for wire in self.wires:
            refused += await wire.refused(probes(wire.keys))
        return refused

    def unblock(self):
        """CLIENT UNBLOCK for each blocked read, as tasks that stop() may
        cancel: whatever they end with is retrieved here, so that asyncio
        never logs "Task exception was never retrieved" for them."""
        tasks = [asyncio.ensure_future(wire.unblock()) for wire in self.wires]
        for task in tasks:
            task.add_done_callback(_retrieve)
        return tasks

    def retry_in(self):
        """How long until the next read of the connection that failed last."""
        now = asyncio.get_running_loop().time()
        return max([wire.retry_at - now for wire in self.wires], default=0.0)

    def back_off_alone(self):
        """Whether each connection backs off on its own (there are several):
        one that fails (its node died, say) holds up none of the others."""
        return len(self.wires) > 1

    async def read_any(self, read):
        """One batch, ``await read(wire)``, from whichever connection answers
        first. With several, each has one read under way; the others keep
        theirs for the next call, so that every slot's entries come through
        the one emit path. A connection whose read failed raises that error
        once, then reads again after its own back-off (at once after a MOVED
        or ASK, which names the new owner), while the others go on. A read
        that ``read_ahead`` started is taken first."""
        if len(self.wires) <= 1:
            wire = self.first
            if wire is not None and wire.read is not None:
                ahead, wire.read = wire.read, None
                return await ahead
            return await read(wire)
        loop = asyncio.get_running_loop()
        while True:
            now = self._start_reads(read, loop)
            reads = [wire.read for wire in self.wires if wire.read is not None]
            later = min([wire.retry_at - now for wire in self.wires if wire.read is None], default=None)
            if reads:
                await asyncio.wait(reads, timeout=later, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(later)
            for wire in self.wires:
                if wire.read is not None and wire.read.done():
                    return self._result(wire, loop.time())

    def _start_reads(self, read, loop):
        """A read on each connection that has none and whose back-off is
        over; the loop's time."""
        now = loop.time()
        for wire in self.wires:
            if wire.read is None and wire.retry_at <= now:
                wire.read = asyncio.ensure_future(read(wire))
        return now

    async def read_ahead(self, read):
        """Start the next reads, before the batch just read is emitted, and
        let them go out: a task's first step runs on the next turn of the
        loop, and the emit that follows may not yield until it is done."""
        if self.wires:  # (a Pub/Sub source has none: it reads no further ahead)
            self._start_reads(read, asyncio.get_running_loop())
            await asyncio.sleep(0)

    async def take_ahead(self):
        """On stop(): what the reads under way brought (a read ahead; with
        several connections, the others' reads too), or [] (none, failed, or
        not answered in time). Taken with the rest of the read being
        emitted, so that they go back together: on a Redis Cluster the read
        ahead is on the connection of the batch being emitted, and a list's
        items it popped must go back behind that batch's, not in front."""
        return [pair for taken in await self._wake_and_take(self.wires) for pair in taken]

    async def _wake_and_take(self, wires):
        """On stop(): the results of the reads under way on ``wires``, those
        still blocked woken with CLIENT UNBLOCK (twice: the first can reach
        Redis before the read it must wake), and cancelled if Redis has not
        answered within READ_STOP_DEADLINE. Failed reads bring nothing. Each
        read is taken off its connection first, so that no other give-back
        (stop() after an abandoned emit) takes it too."""
        reads = [(wire, wire.read) for wire in wires if wire.read is not None]
        for wire, _ in reads:
            wire.read = None
        for _ in range(2):
            blocked = [(wire, read) for wire, read in reads if not read.done()]
            if not blocked:
                break
            for wire, _ in blocked:
                asyncio.ensure_future(wire.unblock()).add_done_callback(_retrieve)
            await asyncio.wait([read for _, read in blocked], timeout=READ_STOP_DEADLINE / 2)
        taken = [await self._brought(read) for _, read in reads]
        return [pairs for pairs in taken if pairs]

    @staticmethod
    async def _brought(read):
        """What a read taken on stop() brought, decoded; nothing where it
        failed, was cancelled, or has not finished (it is cancelled)."""
        if not read.done():
            read.cancel()
            return None
        if read.cancelled() or read.exception() is not None:
            return None
        result = read.result()
        return await result.decode(result.reply) if result.__class__ is _Later else result

    @staticmethod
    def _result(wire, now):
        done, wire.read = wire.read, None
        try:
            result = done.result()
        except Exception as exc:
            if isinstance(exc, redis.exceptions.AskError):  # and MOVED: the new owner is known
                wire.backoff.reset()
                wire.retry_at = now
            else:
                wire.retry_at = now + wire.backoff.step()
            raise
        wire.backoff.reset()
        return result

    async def give_back_reads(self, give_back):
        """On stop(): what the reads not yet emitted had read goes back (with
        several connections, those woken with the others; or a read ahead)."""
        for taken in await self._wake_and_take(self.wires):
            await give_back(taken)

    async def close_idle(self):
        """The read loop was cancelled from outside (``asyncio.run`` ending
        with the source still running, say): close the connections now, while
        their event loop runs. Their read was cut mid-way, so they are never
        read from again, and a stop() after the loop has ended could not
        close them: garbage-collected later, redis-py would close them on a
        closed loop ("Event loop is closed"). A connection whose own read
        (several on a Redis Cluster) may hold entries is left for stop() to
        give them back."""
        for wire in self.wires:
            if wire.read is None or wire.read.cancelled():
                await self._close(wire, cut=True)

    async def close(self):
        wires, self.wires = self.wires, []
        for wire in wires:
            await self._close(wire)

    @staticmethod
    async def _close(wire, cut=False):
        try:
            await asyncio.wait_for(wire.close(cut), READ_STOP_DEADLINE)
        except Exception:  # pragma: no cover - closing a dead socket
            pass


class _SourceLifecycle(_RedisNode, Source):
    """How every Redis source starts and stops, from any thread: ``start()``
    connects, checks and prepares, then runs the read loop as one task;
    ``stop()`` ends it within its deadlines, gives back what was read but not
    emitted, lets the sinks downstream write, flushes the acknowledgements
    and closes the connections. ``_RedisSource`` provides the steps
    (``_connect``, ``_check_permissions``, ``_prepare``, ``_run``,
    ``_close``)."""

    _ledger: Optional[_AckLedger] = None  # for sources that acknowledge

    def __init__(self, *, start=False, **kwargs):
        self._redis = None  # pooled connections: non-blocking commands, acks
        self._readers = _Readers()  # the blocking reads' own connections
        self._task = None  # the read loop
        self._finishing = False  # stop() is under way: see running
        self._lock = None  # see _lifecycle()
        self._stopping = None  # an asyncio.Event, set by stop()
        self._reading = False  # the read loop is waiting on Redis
        self._giving_up = False  # stop() is cancelling the read loop
        self._watch = None  # see _watch_in_flight()
        super().__init__(**kwargs)
        if start:
            starting = self.start()
            if starting is not None:  # inside the event loop: nobody awaits it
                starting.add_done_callback(self._report_failed_start)

    @property
    def running(self) -> bool:
        """True from ``start()`` until ``stop()`` has finished."""
        return self._task is not None or self._finishing

    def _report_failed_start(self, starting):
        if not starting.cancelled() and starting.exception() is not None:
            log.error("%s: start=True failed; the source does not run (%s)",
                      self, _error_text(starting.exception()))

    # ---- start and stop, from any thread --------------------------------

    def start(self) -> Optional[Awaitable[None]]:
        """Connect, prepare and start reading.

        In streamz's default mode this blocks until the source is ready and
        raises any problem (Redis unreachable, wrong password, a permission
        that reading needs, a key of the wrong type) here. Inside a running
        event loop (``asynchronous=True``) it returns an awaitable that does
        the same: ``await source.start()``.

        Returns
        -------
        awaitable or None
            ``None`` in streamz's default mode, once the source reads; inside
            the event loop, an awaitable that is done once it reads.
        """
        self._check_process()
        if self._on_loop_thread():
            return asyncio.ensure_future(self._start())
        _stop_on_sigterm()  # streamz's default mode: the main thread is the user's
        sync(self.loop, self._start)
        return None

    def stop(self) -> Optional[Awaitable[None]]:
        """Stop reading, and finish what the source holds.

        It gives back what was read but not emitted, lets the Redis sinks
        downstream write what they hold, flushes acknowledgements and closes
        the connections. Blocks until done in streamz's default mode; inside
        the event loop it returns an awaitable. ``start()`` afterwards
        resumes.

        Returns
        -------
        awaitable or None
            ``None`` in streamz's default mode, once stopped; inside the event
            loop, an awaitable that is done once stopped.
        """
        if self._task is not None:
            self.stopped = True  # at once: no further entry is emitted
        if self._on_loop_thread():
            stopping = asyncio.ensure_future(self._stop())
            if asyncio.current_task() is self._task:
                # Called from inside this source's own emit (an async sink
                # awaiting it): waiting here would wait on ourselves. The loop
                # ends once this emit returns; the rest of stop() follows.
                done = asyncio.get_running_loop().create_future()
                done.set_result(None)
                return done
            return asyncio.shield(stopping)  # a cancelled caller never aborts the clean-up
        self._on_loop(self._stop)
        return None

    def finish_at_exit(self, left):
        """Python is exiting: stop within ``left`` seconds, or say what is lost."""
        if not self._finish_within(left, self._stop) and self._ledger is not None:
            log.error("%s: not stopped at exit (no time or no event loop left); %d "
                      "acknowledgement(s) not sent: those entries are delivered again",
                      self, self._ledger.unsent())

    def _loop_ended(self):
        if self._task is not None:
            log.warning("%s: its event loop has ended; stop() cannot flush or close", self)

    def _lifecycle(self):
        """One lock for start and stop, so that a start() never runs into the
        end of a stop() (which closes the connections)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def _start(self):
        async with self._lifecycle():
            if self._task is not None:
                if not self._task.done():
                    return  # start() twice runs one read loop
                await self._shutdown(self._task)  # a loop that ended: clean up first
            _warn_without_hiredis()
            _check_dask_client(self)
            try:
                await self._ready()
            except BaseException as exc:
                await self._close()
                if isinstance(exc, Exception):
                    raise self._explain(exc) from None
                raise
            self.stopped = False
            self.started = True
            self._giving_up = False
            self._stopping = asyncio.Event()
            if self._ledger is not None:
                self._ledger.open(self._stopping)
            _live_nodes.add(self)
            self._task = asyncio.ensure_future(self._run())
            if self._ledger is not None:
                self._watch = asyncio.ensure_future(self._watch_in_flight(self._stopping))
            log.info("%s: started, %s", self, self._reading_what())

    async def _ready(self):
        """Connect, check and prepare. Where the topology rides through a
        failover in progress (a Redis Cluster: one master down, its replica
        not yet promoted), an unreachable node or a moved slot is tried again
        with back-off for up to ``topology.start_wait`` seconds, each time
        said in a WARNING; then the last error is raised."""
        loop = asyncio.get_running_loop()
        backoff, end = _Backoff(), loop.time() + self.topology.start_wait
        while True:
            try:
                await self._connect()
                await self._check_permissions()
                self._forget_last_emitted()
                await self._prepare()
                return
            except Exception as exc:
                if not _reconnect_after(exc) or _cannot_be_retried(exc) or loop.time() + backoff.delay > end:
                    raise
                log.warning("%s: not every server of its keys answers (%s); start() tries again in "
                            "%.1f s, for up to %.0f s in all (a failover in progress?)", self,
                            _error_text(exc), backoff.delay, self.topology.start_wait)
                await self._close()
                await asyncio.sleep(backoff.step())

    def _explain(self, exc):
        """``exc`` with a message that names this source and its server."""
        if isinstance(exc, (ValueError, TypeError)):
            return exc
        message = f"{self} could not start: {_error_text(exc)}"
        try:
            return type(exc)(message)
        except Exception:
            return RuntimeError(message)

    async def _stop(self, within=None):
        """stop(), on the loop; ``within`` bounds it in seconds (at exit)."""
        async with self._lifecycle():
            if self._task is not None:
                await self._shutdown(self._task, within)

    async def _shutdown(self, task, within=None):
        loop = asyncio.get_running_loop()
        end = loop.time() + (within if within is not None else math.inf)

        def left(limit):
            return max(0.0, min(limit, end - loop.time()))

        self.stopped = True
        self._stopping.set()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._finishing = True  # running, until the acks are flushed and the connections closed
        try:
            await self._end(task, left)
            await self._readers.give_back_reads(self._give_back)
            self._task = None
            _live_nodes.discard(self)
            stopped = "stopped"
            if self._ledger is not None:
                stopped += await self._flush_acks(left)
            await self._close()
        finally:
            self._finishing = False
        log.info("%s: %s", self, stopped)

    async def _flush_acks(self, left):
        """stop(): let the sinks write, then send the last acks. What the
        log line of stop() says of them."""
        ledger = self._ledger
        acked = ledger.acked
        await self._let_sinks_finish(left(FLUSH_DEADLINE))
        unsent = await ledger.close(left(FLUSH_DEADLINE))
        if unsent:
            log.warning(
                "%s: %d acknowledgement(s) not sent before closing; they are sent "
                "on the next start(), or the entries are delivered again", self, unsent,
            )
        return (f"; {ledger.acked - acked} acknowledgement(s) flushed, {unsent} "
                f"left unsent, {ledger.acked} sent since it was made")

    async def _end(self, task, left):
        """Wait for the read loop to end. A blocking read is woken at once; a
        read that Redis does not answer is cancelled after READ_STOP_DEADLINE.
        An entry being emitted is given EMIT_STOP_DEADLINE to leave the
        pipeline before it is abandoned (not acknowledged; the rest given
        back)."""
        unblocks = []
        for _ in range(2):  # twice: the first can reach Redis before the read it must wake
            if task.done() or not self._reading or self._readers.first is None:
                break
            unblocks += self._readers.unblock()
            await asyncio.wait([task], timeout=left(READ_STOP_DEADLINE) / 2)
        for unblock in unblocks:
            unblock.cancel()
        if not task.done() and not self._reading:
            await asyncio.wait([task], timeout=left(EMIT_STOP_DEADLINE))
            if not task.done():
                log.warning("%s: an emit did not finish in time after stop(); abandoning it", self)
        self._giving_up = True
        while not task.done():
            task.cancel()
            # A cancel that lands as an awaited call completes can be lost
            # (asyncio.wait_for in Python 3.11): cancel again until it ends.
            await asyncio.wait([task], timeout=READ_STOP_DEADLINE)
        if not task.cancelled() and task.exception() is not None:  # pragma: no cover
            log.error("%s: read loop failed (%s)", self, _error_text(task.exception()))

    async def _let_sinks_finish(self, timeout):
        """Give the Redis sinks this source's elements reach up to ``timeout``
        to write what they hold (through their public ``flush()``): an entry
        whose result they store now is acknowledged now, rather than
        delivered again after a restart."""
        if not self._ledger.holds_any() or not timeout:
            return
        flushes = [asyncio.ensure_future(node.flush()) for node in _below(self)
                   if getattr(node, "holds_writes", False)]
        if flushes:
            await asyncio.wait(flushes, timeout=timeout)
            await asyncio.sleep(0)  # streamz calls the acks back on the next loop turn

    def _forget_last_emitted(self):
        """streamz keeps on every node the metadata of the last element it
        emitted (``current_metadata``). It is no hold, but it keeps that
        element's reference alive: a replay would take an entry that a node
        downstream dropped for one still in the pipeline, and skip it."""
        self.current_metadata = None
        for node in _below(self):
            node.current_metadata = None

    def _reading_what(self):
        """For the log line of start(): what the source reads, and from where."""
        return f"reading {self._describe()}"

    def _tick(self):
        """Called on the loop each second while a source that acknowledges runs."""

    async def _watch_in_flight(self, stopping):
        """Say when entries stop leaving the pipeline: nothing else would (the
        read loop itself waits on them, as back-pressure). Each second, the
        figures from Redis may be refreshed (``_tick``): a pipeline that
        holds its entries reads nothing, and they would stay as they were."""
        warned_at = -math.inf
        while True:
            try:
                await asyncio.wait_for(stopping.wait(), 1.0 if STUCK_AFTER is None else min(1.0, STUCK_AFTER / 2))
                return
            except asyncio.TimeoutError:
                pass
            self._tick()
            if STUCK_AFTER is None:
                continue
            age, now = self._ledger.oldest_in_flight_seconds(), time.monotonic()
            if age > STUCK_AFTER and now - warned_at >= STUCK_AFTER:
                warned_at = now
                log.warning(
                    "%s: the oldest entry in flight was read %.0f s ago and has not left the "
                    "pipeline (%d in flight): a node downstream may be stuck (a dead Dask "
                    "scheduler, say); its entries stay pending until it lets go", self, age,
                    self._ledger.in_flight_count())



class _RedisSource(_SourceLifecycle):
    """What every Redis source shares: start and stop from any thread, the
    connections, and the read-and-emit loop with back-off.

    A subclass says how to prepare once connected (``_prepare``), which
    commands reading needs (``_probes``), how to read one batch (``_read``),
    and how to give back what was read but not emitted (``_give_back``). A
    source that acknowledges makes an ``_AckLedger`` in its ``__init__``,
    with the coroutine that sends a batch of acks.
    """

    uses_blocking_reads = True

    def __init__(
        self,
        *,
        url: Optional[str] = None,
        client_kwargs: Optional[Mapping] = None,
        client=None,
        cluster: bool = False,
        decode=True,
        timeout: float = 1.0,
        count: int = 100,
        batch: bool = False,
        start: bool = False,
        **kwargs,
    ):
        self._connection_args(url, client_kwargs, client, cluster)
        self.timeout = _seconds(timeout, "timeout")
        self.count = _positive_int(count, "count")
        self.decode = decode
        self._encoding = _encoding_of(decode)
        self.batch = bool(batch)
        self._read_count = self._emitted = self._failed = self._reconnects = 0
        self._unemitted = None  # the read being emitted (see _read_and_emit)
        self._dead_lettered = 0
        super().__init__(start=start, **kwargs)

    def metrics(self) -> Dict[str, Any]:
        """A snapshot of this source's figures, counted since it was made.

        Callable from any thread; it does not wait on Redis.

        Returns
        -------
        dict
            ``read``: entries (items, messages) read from Redis; ``emitted``:
            emitted downstream; ``failed``: whose processing raised
            downstream; ``acked``: acknowledgements Redis confirmed (consumer
            groups and the reliable list); ``in_flight``: emitted and not yet
            done (held somewhere in the pipeline);
            ``oldest_in_flight_seconds``: how long ago the oldest of those
            was read (0.0 when none is); ``reconnects``: connections lost
            while reading; ``dead_lettered``: entries or items moved to the
            dead-letter stream or list.
        """
        ledger = self._ledger
        return {
            "read": self._read_count,
            "emitted": self._emitted,
            "failed": self._failed,
            "acked": ledger.acked if ledger else 0,
            "in_flight": ledger.in_flight_count() if ledger else 0,
            "oldest_in_flight_seconds": ledger.oldest_in_flight_seconds() if ledger else 0.0,
            "reconnects": self._reconnects,
            "dead_lettered": self._dead_lettered,
        }

    async def server_identity(self):
        """Which server (and database) this source reads, as
        ``(run_id, db)``; None when not connected, or on a Redis Cluster."""
        if self._redis is None:
            return None
        return await self.topology.server_identity(self._redis)

    # ---- connections ----------------------------------------------------

    async def _connect(self):
        self._redis = self._new_client()
        await self._redis.ping()
        if self.uses_blocking_reads:
            await self._readers.open(self._redis, self.topology, self._read_keys(), self._client_name())

    def _read_keys(self):
        """The keys this source's blocking reads wait on."""
        return []

    def _client_name(self):
        """The CLIENT SETNAME of the blocking connections, if any."""
        return None

    async def _check_permissions(self):
        """Raise at start() if the user may not run a command reading needs,
        naming it; otherwise reading would only log the refusal, forever."""
        refused = await self._readers.refused(self._probes)
        if refused:
            command, exc = refused[0]
            raise redis.exceptions.NoPermissionError(
                f"this Redis user may not run {command.upper()} as reading needs it "
                f"({_error_text(exc)}); grant it (docs/production.rst, Permissions (ACL), lists what each node needs)"
            )

    def _block_seconds(self):
        return self._readers.first.block_seconds(self.timeout)

    async def _close(self):
        own, self._redis = self._redis, None
        await self._readers.close()
        if own is not None and own is not self.client:
            try:
                await asyncio.wait_for(own.aclose(), READ_STOP_DEADLINE)
            except Exception:  # pragma: no cover - closing a dead socket
                pass

    # ---- the read loop --------------------------------------------------

    async def _run(self):
        try:
            await self._read_and_emit()
        except asyncio.CancelledError:
            if not self._giving_up:
                log.error("%s: the read loop was cancelled from outside; the source stopped", self)
                await self._readers.close_idle()
            raise
        except BaseException:
            log.exception("%s: the read loop failed; the source stopped", self)
            raise

    async def _read_and_emit(self):
        backoff = _Backoff()
        cancelling = getattr(asyncio.current_task(), "cancelling", None)  # Python 3.11+
        while not self.stopped:
            if cancelling is not None and cancelling():
                # A cancel that redis-py's asyncio.wait_for swallowed (Python
                # 3.11): honour it here, or asyncio.run() would wait forever.
                raise asyncio.CancelledError
            self._reading = True
            try:
                batch = await self._readers.read_any(self._read)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.stopped:
                    break
                if self._readers.back_off_alone():
                    await self._handle_read_error(exc, self._readers.retry_in())
                elif not await self._handle_read_error(exc, backoff.delay):
                    await backoff.wait(self._stopping)
                continue
            finally:
                self._reading = False
            if backoff.delay > BACKOFF_FIRST:
                log.info("%s: Redis answers again; reading", self)
            backoff.reset()
            # What the read ahead must know is read and not yet emitted (a
            # consumer group's claim must not take it): as Redis sent it.
            self._unemitted = batch
            try:
                if batch and READ_AHEAD and not self.stopped:
                    await self._readers.read_ahead(self._read)
                if batch.__class__ is _Later:
                    batch = self._unemitted = await batch.decode(batch.reply)
                self._read_count += len(batch)
                self._after_read(batch)
                await self._emit_batch(batch)
            finally:
                self._unemitted = None

    def _held_now(self):
        """What a replay or a claim about to be sent must skip: the entries
        (items) held in the pipeline or whose ack is queued or being sent,
        taken before the command. Taken after its reply, an ack confirmed in
        the meantime would be missing, and its entry, claimed while its ack
        was on its way, emitted a second time. With a read ahead, the
        entries of the read being emitted too (this source's, though not yet
        tracked; a ``_Later`` holds a stream reply)."""
        held = self._ledger.held()
        unemitted = self._unemitted
        if unemitted.__class__ is _Later:
            held.update((name, entry_id) for name, entries in unemitted.reply for entry_id, _ in entries)
        elif unemitted:
            held.update((ack.key, ack.item) for _, ack in unemitted if isinstance(ack, _Ack))
        return held

    async def _handle_read_error(self, exc, delay):
        """Log a failed read; True if it was recovered from and can be
        retried at once."""
        if _reconnect_after(exc):
            if _on_wrong_server(exc) or "previous master" in str(exc):
                log.warning("%s: the server no longer serves these keys as primary (%s); "
                            "reconnecting in %.1f s", self, _error_text(exc), delay)
            else:
                log.warning("%s: Redis is unreachable (%s); retrying in %.1f s",
                            self, _error_text(exc), delay)
            self._reconnects += 1
            self._forget_last_emitted()
            self._on_disconnect()
            return False
        try:
            if await self._recover(exc):
                return True
        except Exception as recovery_error:
            exc = recovery_error
        log.error("%s: read failed (%s); retrying in %.1f s", self, _error_text(exc), delay)
        return False

    def _after_read(self, batch):
        """Called on the loop after each read, before its batch is emitted."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: read %d", self, len(batch))

    def _track(self, read):
        """What a read emits, as ``(value, origin)`` pairs: with
        ``batch=True`` one list, tracked as one ``_AckAll``. The ledger times
        the read, for ``oldest_in_flight_seconds``."""
        ledger = self._ledger
        acks = [origin for _, origin in read if isinstance(origin, _Ack)] if ledger else ()
        if self.batch and read:
            whole = ledger.batch(acks) if acks else None
            pairs = [([value for value, _ in read], whole)]
            refs = [weakref.ref(whole)] if acks else []
        else:
            pairs = read
            refs = [weakref.ref(ack) for ack in acks]
        if acks:
            ledger.note_read(refs)
        return pairs

    async def _emit_batch(self, read):
        """Emit each ``(value, origin)`` of a read in turn, awaiting its
        futures (the back-pressure). An origin that is a ``_Reference`` is
        tracked until it leaves the pipeline. On stop(), what is left is given
        back. With ``batch=True`` the values go out as one list, tracked as one.
        """
        pairs = self._track(read)
        track = self._ledger.track if self._ledger is not None else None
        for position, (value, origin) in enumerate(pairs):
            if self.stopped:
                _never_emitted(pairs[position:])
                await self._give_back_unemitted(read if self.batch else pairs[position:])
                return
            # This is the per-entry path: inline, no coroutine per entry.
            tracked = isinstance(origin, _Reference)
            try:
                if tracked:
                    track(origin)
                    futures = self._emit(value, metadata=[{"ref": origin}])
                else:
                    futures = self._emit(value)
                if futures:
                    await self._wait_downstream(futures, origin if tracked else None)
            except Exception as exc:
                self._processing_failed(value, origin, exc)
            except asyncio.CancelledError:
                await self._emit_cancelled(value, origin, pairs[position + 1:])
            self._emitted += len(value) if self.batch else 1
            if tracked:
                # The source's own hold, kept until the emit's futures are
                # done: rate_limit, map_async and async sinks let go early.
                origin.release()

    async def _wait_downstream(self, futures, origin):
        """Await an emit's futures; the ledger knows whose they are (the
        source's own hold waits on them)."""
        ledger = self._ledger
        if origin is not None:
            ledger.awaiting = origin
        try:
            if len(futures) == 1:
                await futures[0]
            else:
                await asyncio.gather(*futures)
        finally:
            if origin is not None:
                ledger.awaiting = None  # never stale: an exactly-once sink asks about it

    def _processing_failed(self, value, origin, exc):
        """One log line for an exception raised downstream; the traceback
        only where streamz has not logged it already (its map, filter and
        friends do)."""
        tracked = isinstance(origin, _Reference)
        if tracked:
            origin.fail()
        log.error(
            "%s: processing failed for %s (%s)%s", self, _name_of(value), _error_text(exc),
            "; not acknowledged" if tracked else "",
            exc_info=None if _logged_by_streamz(exc) else exc,
        )
        self._failed += 1  # after the log line, as a sink counts: metrics() never runs ahead of it

    async def _emit_cancelled(self, value, origin, rest):
        if isinstance(origin, _Reference):
            origin.fail()
        if self._giving_up or _being_cancelled():
            # stop() abandoned this emit: what follows is given back.
            _never_emitted(rest)
            await asyncio.shield(self._give_back_unemitted(rest))
            raise asyncio.CancelledError
        # A future downstream was cancelled, not this source.
        log.error("%s: processing was cancelled for %s", self, _name_of(value))

    # ---- hooks for subclasses ------------------------------------------

    def _probes(self, keys):
        """Commands reading ``keys`` needs, as argument lists, checked by
        start()."""
        return []

    async def _prepare(self):
        """Called by start() once connected: check keys, resolve ids."""

    async def _read(self, reader):  # pragma: no cover - abstract
        """Read one batch of ``reader.keys`` with ``reader`` (a ``_Wire``):
        a list of ``(value, origin)``, where origin is an ``_Ack`` for a
        tracked value, else whatever ``_give_back`` needs."""
        raise NotImplementedError

    async def _give_back(self, rest):
        """Return what was read but not emitted because of stop()."""

    async def _give_back_unemitted(self, rest):
        """stop() came mid-read: ``rest``, and after it what a read ahead
        brought, go back together, in their order."""
        ahead = await self._readers.take_ahead()
        _never_emitted(ahead)
        await self._give_back([*rest, *ahead])

    def _on_disconnect(self):
        """Called when the connection was lost while reading."""

    async def _recover(self, exc):
        """Handle a Redis error while reading; True if handled."""
        return False

    async def _check_key_types(self, keys, kind):
        """Raise a clear ``TypeError`` for a key that holds another type."""
        for key in keys:
            found = _text(await self._redis.type(key))
            if found not in (kind, "none"):
                raise TypeError(f"Redis key {key!r} holds a {found}, not a {kind}")


# --------------------------------------------------------------------------
# 9. The sources
# --------------------------------------------------------------------------

# Move an undecodable item to its dead-letter list (and, for a reliable list,
# out of its processing list), in one script. A script stops at the first
# failing call, so the item is removed only once it was written. Redis 7
# checks the user's permissions for both commands first.
MOVE_TO_DEAD_LETTER_LIST = """
if redis.acl_check_cmd and KEYS[2] and not (redis.acl_check_cmd('RPUSH', KEYS[1], 'v')
        and redis.acl_check_cmd('LREM', KEYS[2], 1, 'v')) then
    return redis.error_reply('NOPERM this user may not run RPUSH on ' .. KEYS[1] ..
        ' and LREM on ' .. KEYS[2])
end
redis.call('RPUSH', KEYS[1], ARGV[1])
if KEYS[2] then redis.call('LREM', KEYS[2], 1, ARGV[1]) end
return 1
"""


@Stream.register_api(staticmethod)
class from_redis_list(_RedisSource):
    """Pop items from the head (or the tail) of Redis lists and emit each one.

    Waits with BLPOP over the keys, in the order given; where a backlog is
    waiting it pops up to ``count`` items per key in one round trip (LPOP with
    a count). With ``side="right"`` it pops from the tail (BRPOP, RPOP). With
    ``with_key=True`` it emits ``(key, item)``, for pipelines that read
    several lists. Delivery is **at-most-once**: an item is removed from Redis when
    it is read, so an item held in memory when the process dies is lost. An
    item read but not yet emitted when ``stop()`` is called goes back to the
    head of its list.

    With ``processing_list``, delivery is **at-least-once** (a reliable
    queue): each item is moved atomically (LMOVE, BLMOVE) from the head of
    the one key to the tail of the processing list, emitted, and removed from
    the processing list (LREM) only once it has left the whole pipeline, by
    the same reference counting as ``from_redis_consumer_group``. On start,
    the items left in the processing list (by a crash, or by ``stop()``) are
    emitted first. Give each consumer its own processing list, with a name
    that survives restarts.

    Parameters
    ----------
    keys : str or list of str
        The list key, or several keys, read in the order given.
    timeout : float
        Longest one blocking read waits on Redis, in seconds (kept below the
        client's ``socket_timeout``). ``stop()`` interrupts it at once.
    count : int
        Most items popped from one list in one round trip.
    batch : bool
        ``False`` (default) emits each item; ``True`` emits a list of the
        items of each read (up to ``count`` per key), tracked as one.
    decode : bool or str
        ``True`` (default) emits ``str`` decoded as UTF-8, ``False`` emits the
        ``bytes`` unchanged, a string names another encoding. An item that
        cannot be decoded is logged and moved to ``dead_letter_list``.
    dead_letter_list : str, optional
        Where undecodable items go; default ``"<key>:dead-letter"``.
    processing_list : str, optional
        Makes the queue reliable (see above); needs exactly one key.
    side : {"left", "right"}
        Pop from the head (``"left"``, default) or the tail of the lists.
    with_key : bool
        Emit ``(key, item)`` instead of the item alone.
    url : str, optional
        Redis URL; default the ``REDIS_URL`` environment variable, else
        ``redis://localhost:6379/0``.
    client_kwargs : dict, optional
        Extra keyword arguments for ``redis.asyncio.Redis`` (username,
        password, ssl options, timeouts).
    client : redis.asyncio.Redis, optional
        A ready client; wins over ``url`` and ``client_kwargs``. A
        ``redis.asyncio.cluster.RedisCluster``, or a client from
        ``redis.asyncio.sentinel.Sentinel(...).master_for(name)``, works too:
        the blocking reads follow a failover or a moved slot.
    cluster : bool
        ``True`` when ``url`` names a node of a Redis Cluster. On a cluster,
        keys read together by one command or script must share a slot (a
        reliable list's key, processing list and dead-letter list; a
        stream and its dead-letter stream): ``start()`` says which to rename.
    start : bool
        ``True`` calls ``start()`` when the source is made, as for any
        streamz source.
    **kwargs
        For ``streamz.Source``: ``asynchronous``, ``loop``, ``stream_name``.

    Examples
    --------
    >>> source = Stream.from_redis_list("jobs")  # doctest: +SKIP
    >>> source.sink(print)  # doctest: +SKIP
    >>> source.start()  # doctest: +SKIP
    """


    # LMOVE up to ARGV[1] items in one round trip, stopping at an empty list.
    _MOVE_BATCH = """
        local moved = {}
        for i = 1, tonumber(ARGV[1]) do
            local item = redis.call('LMOVE', KEYS[1], KEYS[2], ARGV[2], 'RIGHT')
            if not item then break end
            moved[i] = item
        end
        return moved
    """

    def __init__(
        self, keys: Union[str, List[str]], *, timeout: float = 1.0, count: int = 100,
        batch: bool = False, decode: Union[bool, str] = True,
        dead_letter_list: Optional[str] = None, processing_list: Optional[str] = None,
        side: str = "left", with_key: bool = False,
        url: Optional[str] = None, client_kwargs: Optional[Mapping[str, Any]] = None,
        client: Optional[_AsyncClient] = None, cluster: bool = False, start: bool = False,
        **kwargs: Any,
    ) -> None:
        self.keys = _names(keys, "keys")
        if side not in ("left", "right"):
            raise ValueError(f'side must be "left" (the head) or "right" (the tail), not {side!r}')
        self.side = side
        self.with_key = bool(with_key)
        self.dead_letter_list = _optional_name(dead_letter_list, "dead_letter_list")
        self.processing_list = _optional_name(processing_list, "processing_list")
        if self.processing_list is not None:
            if len(self.keys) != 1:
                raise ValueError("processing_list needs exactly one key: BLMOVE waits on one list")
            if self.processing_list == self.keys[0]:
                raise ValueError("processing_list must differ from the key it reads")
            self._ledger = _AckLedger(self, self._remove_processed, lambda key, item: ("LREM", key, 1, item))
        self._replay_processing = False
        self._move_batch = None
        super().__init__(timeout=timeout, count=count, batch=batch, decode=decode,
                         url=url, client_kwargs=client_kwargs, client=client, cluster=cluster, start=start, **kwargs)

    def _describe(self):
        keys = ", ".join(map(repr, self.keys))
        if self.processing_list:
            return f"{keys} processing_list={self.processing_list!r}"
        return keys

    def _probes(self, keys):
        timeout = self._block_seconds()
        if not self.processing_list:
            pop = "LPOP" if self.side == "left" else "RPOP"
            return [*[[pop, key, 1] for key in keys], ["B" + pop, *keys, timeout]]
        key, processing = self.keys[0], self.processing_list
        return [
            ["LRANGE", processing, 0, -1],
            ["EVALSHA", "0" * 40, 2, key, processing, 0, self.side.upper()],
            # What the batch-moving script runs, and how redis-py loads it.
            ["LMOVE", key, processing, self.side.upper(), "RIGHT"],
            ["SCRIPT", "LOAD", self._MOVE_BATCH],
            ["BLMOVE", key, processing, self.side.upper(), "RIGHT", timeout],
            ["LREM", processing, 1, "x"],
        ]

    async def _prepare(self):
        if self.processing_list:
            key, tag = self.keys[0], _hash_tag(self.keys[0])
            keys = {key: "key", self.processing_list: "processing_list"}
            if self._encoding is not None:  # undecodable items are moved by a script
                keys.setdefault(self._dead_letter_key(key), "dead_letter_list")
            self.topology.check_same_slot(
                self._redis, keys, "BLMOVE and the scripts of a reliable list need",
                f"give them the key's hash tag, e.g. processing_list='{{{tag}}}:processing' and "
                f"dead_letter_list='{{{tag}}}:dead-letter' (a key named '{{{tag}}}' keeps the "
                "default dead-letter list in its slot)")
        await self._check_key_types(self.keys + ([self.processing_list] if self.processing_list else []), "list")
        if self.processing_list:
            self._move_batch = self._redis.register_script(self._MOVE_BATCH)
            self._replay_processing = True

    def _on_disconnect(self):
        # Items moved just before the connection dropped may never have
        # reached us: replay the processing list once reconnected.
        if self.processing_list:
            self._replay_processing = True

    def _read_keys(self):
        return self.keys

    async def _read(self, reader):
        if self.processing_list:
            return await self._read_reliably(reader)
        # A backlog: up to `count` items from each key in one round trip.
        pop = "LPOP" if self.side == "left" else "RPOP"
        keys = reader.keys
        if len(keys) == 1:  # on the reader's own connection, packed by hiredis
            replies = [await reader.execute(pop, keys[0], self.count)]
        else:
            replies = _raise_refused(await self.topology.pipelined(
                self._redis, [(pop, key, self.count) for key in keys]))
        popped = [(key, item) for key, items in zip(keys, replies) if items for item in items]
        if not popped:
            # Nothing waiting: block until an item arrives (or time runs out).
            reply = await reader.execute("B" + pop, *keys, self._block_seconds())
            if reply is None:
                return []
            popped = [(_text(reply[0]), reply[1])]
        return await self._decode_items(popped)

    async def _read_reliably(self, reader):
        key, processing = self.keys[0], self.processing_list
        if self._replay_processing:
            # Items a crash, a stop() or a lost connection left in the
            # processing list come first; the flag is cleared only once the
            # LRANGE succeeded.
            # Items still on their way through the pipeline are in the
            # processing list too; not twice (taken before the LRANGE: see
            # _held_now).
            held = self._held_now()
            items = await self._redis.lrange(processing, 0, -1)
            self._replay_processing = False
            items = [item for item in items if (processing, item) not in held]
            if items:
                log.info("%s: emitting %d items left in %r", self, len(items), processing)
                return await self._decode_items([(processing, item) for item in items])
        items = await self._move_batch(keys=[key, processing], args=[self.count, self.side.upper()])
        if not items:
            item = await reader.execute(
                "BLMOVE", key, processing, self.side.upper(), "RIGHT", self._block_seconds()
            )
            if item is None:
                return []
            items = [item]
        return await self._decode_items([(processing, item) for item in items])

    async def _decode_items(self, popped):
        """``(value, origin)`` for each popped ``(key, raw item)``; in the
        reliable mode the origin is the item's ``_Ack``. Items that cannot be
        decoded go to the dead-letter list."""
        if self.processing_list:
            origin = self._ledger.ack
        else:
            origin = lambda key, item: (key, item)  # noqa: E731
        source_key = self.keys[0] if self.processing_list else None
        batch, undecodable = [], []
        for key, item in popped:
            try:
                value = _decoded(item, self._encoding)
                if self.with_key:
                    value = (source_key or key, value)
                batch.append((value, origin(key, item)))
            except UnicodeDecodeError as exc:
                undecodable.append((key, item, exc))
        if undecodable:
            stuck = await self._dead_letter(undecodable)
            if stuck and not self.processing_list:
                # Popped, and nowhere to go: everything popped goes back to
                # the head of its list, and the read fails (retried with
                # back-off) until the dead-letter list accepts the item.
                await self._give_back([(None, (key, item)) for key, item in popped])
                raise redis.exceptions.ResponseError(
                    f"item {stuck[0][1][:80]!r} of list {stuck[0][0]!r} cannot be decoded and "
                    f"cannot be moved to the dead-letter list; put back at the head of its list"
                )
        return batch

    def _dead_letter_key(self, key):
        return self.dead_letter_list or f"{key}:dead-letter"

    async def _dead_letter(self, undecodable):
        """Move undecodable items to the dead-letter list (and, in the
        reliable mode, out of the processing list only once it is there).
        Returns those that could not be moved."""
        stuck = []
        where = "the processing list" if self.processing_list else "its list"
        for key, item, exc in undecodable:
            target = self._dead_letter_key(self.keys[0] if self.processing_list else key)
            keys = [target, self.processing_list] if self.processing_list else [target]
            try:
                await self._redis.eval(MOVE_TO_DEAD_LETTER_LIST, len(keys), *keys, item)
            except Exception as failure:
                log.error(
                    "%s: item %r of list %r cannot be decoded (%s), and moving it to list %r "
                    "failed (%s); it stays in %s", self, item[:80], key, exc, target,
                    _error_text(failure), where,
                )
                stuck.append((key, item))
                continue
            self._dead_lettered += 1
            log.error(
                "%s: item %r of list %r cannot be decoded (%s); moved to list %r",
                self, item[:80], key, exc, target,
            )
        return stuck

    async def _remove_processed(self, batch):
        # Items that left the pipeline: drop them from the processing list.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: LREM %d", self, sum(map(len, batch.values())))
        async with self._redis.pipeline(transaction=False) as pipe:
            for processing, items in batch.items():
                for item in items:
                    pipe.lrem(processing, 1, item)
            await pipe.execute()

    async def _give_back(self, rest):
        if self.processing_list:
            return  # still in the processing list: emitted first on the next start
        # stop() came mid-batch: the unemitted items go back to the end of
        # their lists, in their order, as the bytes Redis had.
        by_key = defaultdict(list)
        for _, (key, raw) in rest:
            by_key[key].append(raw)
        push = "LPUSH" if self.side == "left" else "RPUSH"
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, raws in by_key.items():
                pipe.execute_command(push, key, *reversed(raws))
            await pipe.execute()


@Stream.register_api(staticmethod)
class from_redis_streams(_RedisSource):
    """Read one or more Redis Streams (XREAD) from a start id.

    Emits ``Entry(stream, id, fields, deliveries=None)`` per entry, in the
    order Redis returns them. Nothing is consumed or acknowledged: the
    source's ``last_ids`` (stream -> id of the last entry read; after
    ``stop()``, of the last entry emitted) tells where to resume, for example
    ``Stream.from_redis_streams(source.last_ids)``.

    Parameters
    ----------
    streams : str, list of str, or dict of str to str
        A stream name, several, or a dict of name -> start id.
    start_id : str
        Where to start for streams given without an id: ``"$"`` (default)
        means entries added after ``start()`` is called (resolved by
        ``start()`` itself, so nothing added after it returns is missed),
        ``"0"`` the beginning, or an explicit id ``"<ms>-<seq>"``.
    count : int
        Most entries read in one round trip.
    timeout : float
        Longest one blocking read waits on Redis, in seconds.
    batch : bool
        ``False`` (default) emits each entry; ``True`` emits a list of the up
        to ``count`` entries of each read: fewer, larger emits, for pipelines
        that need the throughput. A batch holds one reference and is
        acknowledged (or left pending) as a whole.
    decode : bool or str
        ``True`` (default) decodes field names and values as UTF-8, ``False``
        keeps them as ``bytes``, a string names another encoding. An entry
        that cannot be decoded is logged and skipped; it stays in the stream.
    url, client_kwargs, client, cluster, start : optional
        As for ``from_redis_list``: a URL, a dict, a client, and two bools.
    **kwargs
        As for ``from_redis_list``.
    """

    def __init__(
        self, streams: Union[str, List[str], Mapping[str, str]], *, start_id: str = "$",
        count: int = 100, timeout: float = 1.0, batch: bool = False, decode: Union[bool, str] = True,
        url: Optional[str] = None, client_kwargs: Optional[Mapping[str, Any]] = None,
        client: Optional[_AsyncClient] = None, cluster: bool = False, start: bool = False,
        **kwargs: Any,
    ) -> None:
        self.start_ids = _streams_with_ids(streams, start_id)
        self.last_ids: Dict[str, str] = {}
        self._next_check = 0.0  # see _check_went_back()
        super().__init__(timeout=timeout, count=count, batch=batch, decode=decode,
                         url=url, client_kwargs=client_kwargs, client=client, cluster=cluster, start=start, **kwargs)

    def _describe(self):
        return ", ".join(map(repr, self.start_ids))

    def _reading_what(self):
        after = ", ".join(f"{name!r} after {last_id}" for name, last_id in self.last_ids.items())
        return f"reading {after}"

    def _probes(self, keys):
        probes = [["XREAD", "COUNT", 1, "STREAMS", *keys, *["0"] * len(keys)]]
        probes += [["XREVRANGE", name, "+", "-", "COUNT", 1] for name in keys
                   if self.start_ids[name] == "$"]
        return probes

    async def _prepare(self):
        await self._check_key_types(self.start_ids, "stream")
        for name, start_id in self.start_ids.items():
            if name in self.last_ids:
                continue  # start() after stop() resumes where it stopped
            if start_id == "$":
                # Resolve "$" now: a later XREAD with "$" would skip whatever
                # is added between start() returning and that read.
                last = await self._redis.xrevrange(name, count=1)
                start_id = _text(last[0][0]) if last else "0-0"
            self.last_ids[name] = start_id

    def _read_keys(self):
        return list(self.start_ids)

    async def _read(self, reader):
        names = reader.keys
        reply = _stream_replies(await reader.execute(
            "XREAD", "COUNT", self.count, "BLOCK", int(self._block_seconds() * 1000),
            "STREAMS", *names, *[self.last_ids[name] for name in names], **NEVER_DECODE,
        ))
        if not reply:
            await self._check_went_back(names)
            return []
        for name, entries in reply:
            self.last_ids[name] = entries[-1][0].decode()
        return _Later(self._entries_of, reply)

    async def _entries_of(self, reply):
        """The ``(Entry, None)`` pairs of ``_stream_replies``; an entry that
        cannot be decoded is logged and skipped (it stays in the stream)."""
        try:  # the common case, inline, from the raw reply: it runs once per entry
            decode = _field_decoder(self._encoding)
            return [
                (_new_tuple(Entry, (name, raw_id.decode(), dict(zip(pairs, pairs)))), None)
                for name, entries in reply
                for raw_id, flat in entries
                for pairs in (decode(flat),)
            ]
        except UnicodeDecodeError:
            pass  # the loop below says which entry
        batch = []
        for name, entries in reply:
            for raw_id, flat in entries:
                try:
                    fields = _entry_fields(flat, self._encoding)
                except UnicodeDecodeError as exc:
                    log.error(
                        "%s: entry %s of stream %r cannot be decoded (%s); skipped, "
                        "it stays in the stream", self, raw_id.decode(), name, exc,
                    )
                    continue
                batch.append((_new_tuple(Entry, (name, raw_id.decode(), fields)), None))
        return batch

    async def _check_went_back(self, names):
        """While idle, about once a second: a stream deleted and made again
        with lower ids (restored, recreated by hand) would never be read past
        the last id read; it is read from its start instead, and said so."""
        now = asyncio.get_running_loop().time()
        if now < self._next_check:
            return
        self._next_check = now + FIGURES_EVERY
        for name in names:
            try:
                last = await self._redis.xrevrange(name, count=1)
            except redis.exceptions.ResponseError:  # no permission for XREVRANGE: no check
                self._next_check = math.inf
                return
            if last and _id_order(last[0][0]) < _id_order(self.last_ids[name]):
                log.warning("%s: stream %r went back: its last entry %s is before the last one "
                            "read, %s (deleted and made again?); reading it from its start",
                            self, name, _text(last[0][0]), self.last_ids[name])
                self.last_ids[name] = "0-0"

    async def _give_back(self, rest):
        # Read but not emitted: start() after stop() reads them again, from
        # just before the first of them in each stream.
        for entry, _ in reversed(rest):
            before = _id_before(entry.id)
            if _id_order(before) < _id_order(self.last_ids[entry.stream]):  # only ever back
                self.last_ids[entry.stream] = before


# ---- The consumer group's parts: figures, claims, dead letters --------------


async def _delivered(client, group, consumer, reply):
    """How many times Redis has delivered each entry of ``reply`` (replayed
    or claimed, now pending in ``consumer``): (stream, id) -> count."""
    # One XPENDING per entry (pipelined): a range from the first id to the
    # last would also count the consumer's other pending entries.
    async with client.pipeline(transaction=False) as pipe:
        for name, entries in reply:
            for entry_id, _ in entries:
                pipe.xpending_range(name, group, entry_id, entry_id, 1, consumername=consumer)
        answers = iter(await pipe.execute())
    return {
        (name, entry_id): count
        for name, entries in reply
        for _ in entries
        for entry_id, count in _delivery_counts(next(answers)).items()
    }


async def _group_lag(client, stream, group_info, last_id):
    """How many entries of ``stream`` the group (its XINFO GROUPS row) has
    not been delivered yet: 0 when it has delivered ``last_id`` (the
    stream's last-generated-id), whatever Redis's ``lag`` says (after a
    forced failover on Redis 7.0 it can stay above 1,000 with nothing left);
    else Redis 7's ``lag``, else counted after its last-delivered-id, or None
    beyond LAG_COUNT_LIMIT."""
    last_delivered = _info_field(group_info, "last-delivered-id")
    if _id_order(last_delivered) >= _id_order(last_id):
        return 0
    lag = _info_field(group_info, "lag")
    if lag is not None:
        return lag
    after, counted = "(" + _text(last_delivered), 0
    while counted <= LAG_COUNT_LIMIT:
        page = await client.xrange(stream, after, "+", count=1000)
        if not page:
            return counted
        counted += len(page)
        after = "(" + _text(page[-1][0])
    return None


class _NoHousekeeping:
    """A consumer group that neither trims nor removes consumers. With
    ``trim_acknowledged`` or ``remove_idle_consumers``,
    ``streamz_redis_operations.Housekeeper`` takes its place."""

    def probes(self, names):
        return []

    async def tidy(self, client):
        """On the figures' beat, about once a second."""

    async def after_sweep(self, client):
        """At the end of each claim sweep."""

    def figures(self):
        return {"trimmed": 0}


class _GroupFigures:
    """A consumer's figures from Redis (``lag`` and ``pending``), refreshed
    beside the read loop, never in its way, at most every FIGURES_EVERY
    seconds; the housekeeper tidies on the same beat."""

    def __init__(self, source, housekeeper):
        self.source = source
        self.housekeeper = housekeeper
        self.lag = self.pending = None  # None until known
        self.next = 0.0
        self.task = None

    def after_read(self, client):
        now = asyncio.get_running_loop().time()
        if now >= self.next and (self.task is None or self.task.done()):
            self.next = now + FIGURES_EVERY
            self.task = asyncio.ensure_future(self.refresh(client))

    async def refresh(self, client):
        source = self.source
        try:
            lag, pending = 0, 0
            for name in source.start_ids:
                stream_lag = await self._lag(client, name)
                lag = None if lag is None or stream_lag is None else lag + stream_lag
                for consumer in await client.xinfo_consumers(name, source.group):
                    if _text(consumer["name"]) == source.consumer:
                        pending += consumer["pending"]
            self.lag, self.pending = lag, pending
        except Exception as exc:
            log.debug("%s: lag and pending not refreshed (%s)", source, _error_text(exc))
        await self.housekeeper.tidy(client)

    async def _lag(self, client, name):
        group = self.source.group
        groups = [g for g in await client.xinfo_groups(name) if _text(g["name"]) == group]
        if not groups:
            return None
        last_id = (await client.xinfo_stream(name))["last-generated-id"]
        return await _group_lag(client, name, groups[0], last_id)


class _ClaimSweep:
    """``claim_idle``: every ``claim_idle`` seconds, a sweep over the group's
    entries idle for longer than that, one XAUTOCLAIM of up to ``count``
    entries per step and stream. XAUTOCLAIM is atomic: once one consumer has
    claimed an entry its idle time restarts, so no other consumer takes it
    too."""

    def __init__(self, source, idle):
        self.source = source
        self.idle = idle
        self.cursors = None  # stream -> XAUTOCLAIM cursor during a sweep
        self.next = 0.0

    def reset(self):
        self.cursors, self.next = None, 0.0

    def due(self):
        return self.cursors is not None or asyncio.get_running_loop().time() >= self.next

    async def step(self, reader):
        """One step on ``reader``'s streams: ``(claimed reply, whether the
        sweep has ended)``."""
        source = self.source
        if self.cursors is None:
            self.cursors = {name: "0-0" for name in source.start_ids}
        reply = []
        for name, cursor in list(self.cursors.items()):
            if name not in reader.keys:
                continue  # another slot's: its own connection claims them
            entries = await self._claim(reader, name, cursor)
            if entries:
                reply.append((name, entries))
                log.info("%s: claimed %d idle entries of stream %r", source, len(entries), name)
        if self.cursors:
            return reply, False
        self.cursors = None
        self.next = asyncio.get_running_loop().time() + self.idle
        return reply, True

    async def _claim(self, reader, name, cursor):
        source = self.source
        next_cursor, entries, deleted = _autoclaimed(await reader.execute(
            "XAUTOCLAIM", name, source.group, source.consumer, int(self.idle * 1000),
            cursor, "COUNT", source.count, **NEVER_DECODE,
        ))
        if deleted:  # Redis 7 drops deleted entries itself
            shown = ", ".join(deleted[:3]) + (f" and {len(deleted) - 3} more" if len(deleted) > 3 else "")
            log.warning(
                "%s: %d pending entries of stream %r are no longer in the stream (%s); "
                "Redis removed them from the group", source, len(deleted), name, shown,
            )
        if next_cursor == "0-0":
            del self.cursors[name]
        else:
            self.cursors[name] = next_cursor
        return entries


class _ConsumerNames:
    """Who reads as which consumer of a group. A consumer group source names
    its blocking connections after its group, its consumer and its streams
    (CLIENT SETNAME ``streamz-redis/<group>/<consumer>/<stream>,...``, each
    percent-encoded), so that a consumer can be told alive (CLIENT LIST) where
    Redis before 7.2 does not say so (a blocking read that returns nothing
    leaves the consumer's ``idle`` growing), and a second process reading a
    stream as the same consumer can be noticed. (A group is a stream's: one
    name on two streams is two consumers.)"""

    def __init__(self, source):
        self.source = source

    def prefix(self):
        return f"{CLIENT_NAME_PREFIX}{quote(self.source.group, safe='')}/"

    def client_name(self):
        streams = ",".join(quote(name, safe="") for name in sorted(self.source.start_ids))
        return f"{self.prefix()}{quote(self.source.consumer, safe='')}/{streams}"

    def readers(self, rows):
        """``(consumer, streams, row)`` of the connections in ``rows`` (CLIENT
        LIST) that read this group as some consumer."""
        prefix = self.prefix()
        for row in rows:
            if row["name"].startswith(prefix):
                consumer, _, streams = row["name"][len(prefix):].partition("/")
                yield unquote(consumer), {unquote(name) for name in streams.split(",")}, row

    async def live(self, wires):
        live = {self.source.consumer}
        for wire in wires:
            others = await wire.others()
            if others is None:
                return None
            live.update(consumer for consumer, _, _ in self.readers(others))
        return live

    async def say_if_taken(self, wires):
        """Two processes reading one stream as one consumer share its entries
        and replay each other's pending ones, silently: say so at start()."""
        source = self.source
        for wire in wires:
            taken = [row for consumer, streams, row in self.readers(await wire.others() or ())
                     if consumer == source.consumer and streams & set(source.start_ids)]
            if taken:
                where = ", ".join(f"{row.get('addr')} (client {row['id']})" for row in taken[:3])
                log.error("%s: another process already reads as consumer %r of group %r (%s): "
                          "the two share its entries, and each replays the other's pending "
                          "ones; give each process a name of its own", source, source.consumer,
                          source.group, where)
                return


class _DeadLetterStream:
    """``max_deliveries``: where entries delivered too often go, and the
    script that moves one there and acknowledges it (both or neither). Redis
    7 checks the user's permissions for both commands first, so that a user
    who may write but not acknowledge does not write the entry again each
    time it comes back."""

    MOVE = """
if redis.acl_check_cmd and not (redis.acl_check_cmd('XADD', KEYS[1], '*', 'f', 'v')
        and redis.acl_check_cmd('XACK', KEYS[2], ARGV[1], ARGV[2])) then
    return redis.error_reply('NOPERM this user may not run XADD on ' .. KEYS[1] ..
        ' and XACK on ' .. KEYS[2])
end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
return redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
"""

    def __init__(self, source, stream, max_deliveries):
        self.source = source
        self.stream = stream  # None: "<stream>:dead-letter"
        self.max_deliveries = max_deliveries

    def of(self, name):
        return self.stream or f"{name}:dead-letter"

    def check_slots(self, topology, client, names):
        """On a Redis Cluster, each stream and its dead-letter stream must
        share a slot: the script needs both."""
        for name in names:
            tag = _hash_tag(name)
            topology.check_same_slot(
                client, {name: "stream", self.of(name): "dead_letter_stream"},
                "the script that moves a dead letter and acknowledges it needs",
                f"name the stream with a hash tag ('{{{tag}}}', whose dead letters go to "
                f"'{{{tag}}}:dead-letter' by default) or give "
                f"dead_letter_stream='{{{tag}}}:dead-letter'")

    async def move(self, client, dead):
        """Move ``(stream, id, flat fields, deliveries)`` entries, each
        acknowledged only once it is there. One that cannot be moved stays
        pending, and is tried again when it comes back. How many moved."""
        source, moved = self.source, 0
        for name, entry_id, flat, deliveries in dead:
            target = self.of(name)
            fields = [*flat, "source_stream", name, "source_id", entry_id, "deliveries", deliveries]
            try:
                await client.eval(self.MOVE, 2, target, name, source.group, entry_id, *fields)
            except Exception as failure:
                log.error(
                    "%s: entry %s of stream %r was delivered %d times (max_deliveries=%d), and "
                    "moving it to stream %r failed (%s); it stays pending", source, entry_id,
                    name, deliveries, self.max_deliveries, target, _error_text(failure),
                )
                continue
            moved += 1
            log.error(
                "%s: entry %s of stream %r was delivered %d times (max_deliveries=%d); "
                "moved to stream %r", source, entry_id, name, deliveries,
                self.max_deliveries, target,
            )
        return moved


@Stream.register_api(staticmethod)
class from_redis_consumer_group(_RedisSource):
    """Read Redis Streams as one consumer of a consumer group (XREADGROUP).

    Several sources with the same ``group`` and different ``consumer`` names
    share the entries. Emits ``Entry(stream, id, fields, deliveries)``.

    Delivery is **at-least-once**. An entry is acknowledged (XACK) only once it
    has left the whole pipeline, by streamz reference counting: after every
    sink it reached, or at once if a ``filter`` dropped it. Nodes that hold
    elements (``buffer``, ``partition``, windows, ``collect``, ``latest``)
    delay the acknowledgement until they let go. Acks are batched: one XACK
    per stream per round trip, sent as soon as the previous one returns, and
    flushed on ``stop()``. An entry whose processing raised is not
    acknowledged: it stays pending, and comes back on the next start of a
    consumer with the same name (which first replays its own pending
    entries), after a lost connection, or through ``claim_idle``.

    Parameters
    ----------
    streams : str, list of str, or dict of str to str
        A stream name, several, or a dict of name -> start id for the group.
    group : str
        The consumer group; created by ``start()`` if missing (with MKSTREAM).
    consumer : str
        This consumer's name. Keep it across restarts: pending entries are
        replayed only to a consumer of the same name.
    start_id : str
        Where a new group starts: ``"$"`` (default) entries added after
        ``start()``, ``"0"`` the whole stream, or an explicit id. Ignored for
        a group that already exists.
    count : int
        Most entries read in one round trip.
    timeout : float
        Longest one blocking read waits on Redis, in seconds.
    claim_idle : float, optional
        When set, every ``claim_idle`` seconds the source takes over the
        group's entries that have been pending longer than ``claim_idle``
        seconds in any consumer (XAUTOCLAIM), for example one that died for
        good, and emits them. It must exceed the slowest processing time of
        an entry, or entries still being processed elsewhere are processed
        twice.
    remove_idle_consumers : float, optional
        Needs ``claim_idle``. At the end of each claim sweep, the group's
        other consumers idle (no read, no claim) for longer than this many
        seconds and holding no pending entry are removed from the group
        (XGROUP DELCONSUMER, checked and done in one script). A dead
        consumer's entries are claimed first (after ``claim_idle``), so
        nothing is lost, and a group whose consumers have generated names
        does not grow without bound. A live consumer, one that a
        streamz-redis source reads as (its connections are named after it),
        is never removed; before Redis 7.2, which cannot tell otherwise,
        nothing is removed without ``client|list``. Needs ``eval`` (or
        ``evalsha``), ``xinfo`` and ``xgroup|delconsumer``.
    max_deliveries : int, optional
        An entry that Redis has delivered more than ``max_deliveries`` times
        is not emitted again: it is added to ``dead_letter_stream`` with its
        original fields plus ``source_stream``, ``source_id`` and
        ``deliveries``, then acknowledged.
    dead_letter_stream : str, optional
        Where such entries go; default ``"<stream>:dead-letter"``.
    trim_acknowledged : bool
        ``True`` keeps the streams bounded: about once a second, each stream
        is trimmed (XTRIM MINID, in one script) up to the oldest entry that
        some group still needs (pending in any group, or not yet delivered
        to one), never further. A stream without groups is never trimmed.
        Needs ``eval``, ``xinfo``, ``xpending``, ``xrange`` and ``xtrim``.
    batch : bool
        As for ``from_redis_streams``: a list per read, acknowledged as a whole.
    decode : bool or str
        As for ``from_redis_streams``. An entry that cannot be decoded is
        logged and not acknowledged: it stays pending (and, with
        ``max_deliveries``, ends in the dead-letter stream).
    url, client_kwargs, client, cluster, start : optional
        As for ``from_redis_list``: a URL, a dict, a client, and two bools.
    **kwargs
        As for ``from_redis_list``.
    """

    def __init__(
        self, streams: Union[str, List[str], Mapping[str, str]], group: str, consumer: str, *,
        start_id: str = "$", count: int = 100,
        timeout: float = 1.0, claim_idle: Optional[float] = None,
        remove_idle_consumers: Optional[float] = None,
        max_deliveries: Optional[int] = None, dead_letter_stream: Optional[str] = None,
        trim_acknowledged: bool = False, batch: bool = False, decode: Union[bool, str] = True,
        url: Optional[str] = None, client_kwargs: Optional[Mapping[str, Any]] = None,
        client: Optional[_AsyncClient] = None, cluster: bool = False, start: bool = False,
        **kwargs: Any,
    ) -> None:
        self.start_ids = _streams_with_ids(streams, start_id)
        self.group = _name(group, "group")
        self.consumer = _name(consumer, "consumer")
        self.claim_idle = _seconds(claim_idle, "claim_idle", optional=True)
        self.remove_idle_consumers = _seconds(
            remove_idle_consumers, "remove_idle_consumers", optional=True
        )
        if self.remove_idle_consumers is not None and self.claim_idle is None:
            # Removing a consumer that still holds entries would drop them
            # from the group: only a claim sweep can empty it first.
            raise ValueError("remove_idle_consumers needs claim_idle")
        self.max_deliveries = _positive_int(max_deliveries, "max_deliveries", optional=True)
        self.dead_letter_stream = _optional_name(dead_letter_stream, "dead_letter_stream")
        self.trim_acknowledged = bool(trim_acknowledged)
        self._ledger = _AckLedger(self, self._xack, lambda key, item: ("XACK", key, self.group, item))
        self._housekeeper = _NoHousekeeping()
        if self.trim_acknowledged or self.remove_idle_consumers is not None:
            self._housekeeper = _optional(
                "streamz_redis_operations", "trim_acknowledged or remove_idle_consumers"
            ).Housekeeper(self, self.trim_acknowledged, self.remove_idle_consumers)
        self._figures = _GroupFigures(self, self._housekeeper)
        self._claims = None if self.claim_idle is None else _ClaimSweep(self, self.claim_idle)
        self._dead_letters = _DeadLetterStream(self, self.dead_letter_stream, self.max_deliveries)
        self._names = _ConsumerNames(self)
        self._replay_from = None  # stream -> id while replaying pending entries
        self._last_read: Dict[str, str] = {}  # stream -> id of the last new entry read
        self._recreated = False  # the group was recreated since the last read
        self._group_starts: Dict[str, str] = {}  # stream -> where its group starts, for start()'s log line
        super().__init__(timeout=timeout, count=count, batch=batch, decode=decode,
                         url=url, client_kwargs=client_kwargs, client=client, cluster=cluster, start=start, **kwargs)

    def metrics(self) -> Dict[str, Any]:
        """A snapshot of this source's figures: every source's, and the group's.

        Returns
        -------
        dict
            Every source's figures (see ``from_redis_list.metrics``), and
            ``lag`` (the group's entries not yet delivered to any consumer,
            summed over its streams; ``None`` where Redis does not say and
            over LAG_COUNT_LIMIT) and ``pending`` (delivered to this consumer,
            not yet acknowledged), from Redis about once a second (``None``
            until known); ``trimmed`` and ``removed_consumers`` by this source,
            with ``trim_acknowledged`` and ``remove_idle_consumers``.
        """
        figures = super().metrics()
        figures.update(lag=self._figures.lag, pending=self._figures.pending)
        figures.update(self._housekeeper.figures())
        return figures

    def _reading_what(self):
        options = [f"{name}={getattr(self, name)!r}" for name in
                   ("claim_idle", "remove_idle_consumers", "max_deliveries", "trim_acknowledged")
                   if getattr(self, name)]
        starts = "; ".join(f"{name!r}: {where}" for name, where in self._group_starts.items())
        return (f"reading {', '.join(map(repr, self.start_ids))} as consumer {self.consumer!r} "
                f"of group {self.group!r}: its pending entries first, then new ones"
                + (f" ({', '.join(options)})" if options else "") + (f"; {starts}" if starts else ""))

    def _after_read(self, batch):
        super()._after_read(batch)
        self._figures.after_read(self._redis)

    def _tick(self):
        self._figures.after_read(self._redis)  # at most every FIGURES_EVERY

    def _describe(self):
        names = ", ".join(map(repr, self.start_ids))
        return f"{names} group={self.group!r} consumer={self.consumer!r}"

    def _probes(self, keys):
        names = list(keys)
        probes = [
            ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", 1,
             "STREAMS", *names, *["0"] * len(names)],
            *[["XACK", name, self.group, "0-1"] for name in names],
            *[["XPENDING", name, self.group, "-", "+", 1, self.consumer] for name in names],
        ]
        if self.claim_idle is not None:
            probes += [["XAUTOCLAIM", name, self.group, self.consumer, 1, "0-0", "COUNT", 1]
                       for name in names]
        return probes + self._housekeeper.probes(names)

    def _read_keys(self):
        return list(self.start_ids)

    def _client_name(self):
        return self._names.client_name()

    async def live_consumers(self) -> Optional[List[str]]:
        """The names of this group's consumers that some streamz-redis source
        reads as right now (their connections' CLIENT SETNAME), this one
        included; None where this user may not run CLIENT LIST."""
        return await self._names.live(self._readers.wires)

    async def _prepare(self):
        await self._names.say_if_taken(self._readers.wires)
        if self.max_deliveries is not None:
            self._dead_letters.check_slots(self.topology, self._redis, self.start_ids)
        await self._check_key_types(self.start_ids, "stream")
        for name, start_id in self.start_ids.items():
            self._group_starts[name] = await self._create_group(name, start_id)
        self._replay_from = {name: "0" for name in self.start_ids}
        if self._claims is not None:
            self._claims.reset()

    async def _create_group(self, name, start_id):
        """Create the group at ``start_id``; say where it starts (for the
        log line of start())."""
        try:
            await self._redis.xgroup_create(name, self.group, start_id, mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
            return "the group goes on after the last entry it delivered"
        return "a new group, from the stream's start" if start_id == "0" else (
            "a new group, from the entries added now on" if start_id == "$"
            else f"a new group, after {start_id}")

    async def _read(self, reader):
        if self._replay_from:
            batch = await self._read_pending(reader)
            if batch is not None:
                return batch
        if self._claims is not None and self._claims.due():
            batch = await self._claim(reader)
            if batch:
                return batch
        reply = _stream_entries(await reader.execute(
            "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", self.count,
            "BLOCK", int(self._block_seconds() * 1000),
            "STREAMS", *reader.keys, *[">"] * len(reader.keys), **NEVER_DECODE,
        ))
        self._recreated = False
        for name, entries in reply:
            self._last_read[name] = entries[-1][0]
        return _Later(self._batch_of, reply) if reply else []

    async def _read_pending(self, reader):
        """One batch of this consumer's own pending entries in ``reader``'s
        streams, or None once they are all replayed."""
        replay = {name: self._replay_from[name] for name in reader.keys if name in self._replay_from}
        if not replay:
            return None  # replayed; other slots' streams may not be yet
        held = self._held_now()
        reply = _stream_entries(await reader.execute(
            "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", self.count,
            "STREAMS", *replay, *replay.values(), **NEVER_DECODE,
        ))
        if self._replay_from is None:
            return None  # pragma: no cover - replayed meanwhile by another connection
        if not reply:
            for name in replay:
                self._replay_from.pop(name, None)
            if not self._replay_from:
                self._replay_from = None
            return None
        for name, entries in reply:
            self._replay_from[name] = entries[-1][0]
        return await self._batch_of(reply, await _delivered(self._redis, self.group, self.consumer, reply), held)

    async def _claim(self, reader):
        """One step of a claim sweep; at its end, the housekeeper's turn
        (``remove_idle_consumers``: a dead consumer's entries were claimed by
        the sweep once idle for ``claim_idle``)."""
        held = self._held_now()
        reply, swept = await self._claims.step(reader)
        if swept:
            await self._housekeeper.after_sweep(self._redis)
        if not reply:
            return []
        return await self._batch_of(reply, await _delivered(self._redis, self.group, self.consumer, reply), held)

    async def _batch_of(self, reply, counts=None, held=()):
        """Entries of an XREADGROUP or XAUTOCLAIM reply, as ``(Entry, _Ack)``.

        ``counts`` has the delivery counts of replayed and claimed entries,
        ``held`` what of them is still this source's (``_held_now``);
        entries read with ``>`` are on their first delivery."""
        if counts is None:
            try:
                return self._first_deliveries(reply)
            except UnicodeDecodeError:
                pass  # the slow path below says which entry, and leaves it pending
        ledger = self._ledger
        batch, gone, dead = [], [], []
        for name, entries in reply:
            for entry_id, flat in entries:
                if (name, entry_id) in held:
                    continue  # replayed while still on its way through the pipeline
                entry = self._entry(name, entry_id, flat, counts, gone, dead)
                if entry is not None:
                    batch.append((entry, _Ack(ledger, name, entry_id)))
        if dead:
            self._dead_lettered += await self._dead_letters.move(self._redis, dead)
        if gone:
            self._acknowledge_gone(gone)
        return batch

    def _acknowledge_gone(self, gone):
        """Pending entries deleted or trimmed from their stream since they
        were delivered: acknowledged without emitting them, one log line a
        read."""
        for name in dict.fromkeys(ack.key for ack in gone):
            ids = [ack.item for ack in gone if ack.key == name]
            shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
            log.warning("%s: %d pending entries of stream %r are no longer in the stream (%s); "
                        "acknowledged without emitting them", self, len(ids), name, shown)
        for ack in gone:
            ack()

    def _entry(self, name, entry_id, flat, counts, gone, dead):
        """The ``Entry`` to emit, or None: for an entry deleted from the
        stream (its ack goes to ``gone``), delivered too often (it goes to
        ``dead``), or that cannot be decoded (it stays pending)."""
        if not flat:  # deleted or trimmed from the stream since it was delivered
            gone.append(self._ledger.ack(name, entry_id))
            return None
        deliveries = 1 if counts is None else counts.get((name, entry_id), 1)
        if self.max_deliveries is not None and deliveries > self.max_deliveries:
            dead.append((name, entry_id, flat, deliveries))
            return None
        try:
            fields = _entry_fields(flat, self._encoding)
        except UnicodeDecodeError as exc:
            log.error(
                "%s: entry %s of stream %r cannot be decoded (%s); not "
                "acknowledged, it stays pending", self, entry_id, name, exc,
            )
            return None
        if counts is None:
            return _new_tuple(_FirstDelivery, (name, entry_id, fields))
        entry = _new_tuple(Entry, (name, entry_id, fields))
        entry.deliveries = deliveries
        return entry

    def _first_deliveries(self, reply):
        """``_batch_of`` for entries read with ``>``, the common case: inline,
        as it runs once per entry. Raises ``UnicodeDecodeError`` for an entry
        that cannot be decoded."""
        batch, ledger, decode = [], self._ledger, _field_decoder(self._encoding)
        append = batch.append
        for name, entries in reply:
            for entry_id, flat in entries:
                pairs = decode(flat)
                entry = _new_tuple(_FirstDelivery, (name, entry_id, dict(zip(pairs, pairs))))
                append((entry, _Ack(ledger, name, entry_id)))
        return batch

    async def _xack(self, batch):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: XACK %d", self, sum(map(len, batch.values())))
        commands = [("XACK", name, self.group, *ids) for name, ids in batch.items()]
        _raise_refused(await self.topology.pipelined(self._redis, commands))

    async def _recover(self, exc):
        if not str(exc).startswith("NOGROUP"):
            return False
        if self._recreated:
            raise exc  # recreated, and gone again: back off (logged by the loop)
        # The stream or the group was deleted, or Redis restarted empty.
        # Recreate the group just after the last entry this source read, so
        # that entries added since it vanished are neither skipped nor read
        # twice.
        for name in self.start_ids:
            await self._create_group(name, await self._recreate_from(name, exc))
        self._replay_from = {name: "0" for name in self.start_ids}
        self._recreated = True
        return True

    async def _recreate_from(self, name, exc):
        """Where a vanished group starts again: just after the last entry
        this source read, so that entries added since it vanished are neither
        skipped nor read twice; but at the stream's start where the stream is
        new (gone, or its last entry before the last one read: its ids went
        back), or its entries would never be delivered."""
        last_read = self._last_read.get(name, "0")
        try:
            last = await self._redis.xrevrange(name, count=1)
        except redis.exceptions.ResponseError:  # no permission: as if the group alone went
            last = [(last_read, None)]
        if last and _id_order(last[0][0]) >= _id_order(last_read):
            log.warning("%s: %s; recreating the group on stream %r after the last entry read",
                        self, _error_text(exc), name)
            return last_read
        log.warning("%s: %s; stream %r was deleted, or recreated with ids before the last "
                    "entry read (%s): recreating the group at its start, so that every entry "
                    "of the new stream is delivered", self, _error_text(exc), name, last_read)
        return "0"

    def _on_disconnect(self):
        # Entries delivered just before the connection dropped may never have
        # reached us; they are pending under our name, so replay them first.
        self._replay_from = {name: "0" for name in self.start_ids}


@Stream.register_api(staticmethod)
class from_redis_pubsub(_RedisSource):
    """Subscribe to Redis Pub/Sub channels and emit each message.

    Emits ``Message(channel, data, pattern=None)``. Delivery is
    **at-most-once**, as Redis Pub/Sub itself: a message published while the
    source is not connected (stopped, or Redis unreachable) is lost, and so is
    a message received but not yet emitted when ``stop()`` is called. After a
    lost connection the source reconnects with capped back-off and subscribes
    again by itself. A message that matches a channel and a pattern (or two
    patterns) is delivered once per subscription, as Redis sends it.

    ``start()`` returns once Redis has confirmed every subscription, so a
    message published after it returns is received.

    Parameters
    ----------
    channels : str or list of str, optional
        Channels to SUBSCRIBE to.
    patterns : str or list of str, optional
        Glob-style patterns to PSUBSCRIBE to (``"news.*"``). Give channels,
        patterns or both.
    decode : bool or str
        ``True`` (default) decodes ``data`` as UTF-8, ``False`` keeps it as
        ``bytes``, a string names another encoding. A message that cannot be
        decoded is logged and dropped. Channel names are always ``str``.
    count : int
        Most messages emitted in one batch.
    timeout : float
        As for the other sources, but one read of a subscription waits at
        most 0.1 s (it cannot be woken by CLIENT UNBLOCK), so that ``stop()``
        returns at once.
    url, client_kwargs, client, cluster, start : optional
        As for ``from_redis_list``: a URL, a dict, a client, and two bools.
    **kwargs
        As for ``from_redis_list``.

    Examples
    --------
    >>> source = Stream.from_redis_pubsub("news", patterns="alerts.*")  # doctest: +SKIP
    >>> source.map(lambda m: m.data).sink(print)  # doctest: +SKIP
    >>> source.start()  # doctest: +SKIP
    """

    uses_blocking_reads = False  # the subscription has a connection of its own

    def __init__(
        self, channels: Union[str, List[str], None] = None, *,
        patterns: Union[str, List[str], None] = None, decode: Union[bool, str] = True,
        count: int = 100, timeout: float = 1.0,
        url: Optional[str] = None, client_kwargs: Optional[Mapping[str, Any]] = None,
        client: Optional[_AsyncClient] = None, cluster: bool = False, start: bool = False,
        **kwargs: Any,
    ) -> None:
        self.channels = list(dict.fromkeys(_names(channels, "channels"))) if channels else []
        self.patterns = list(dict.fromkeys(_names(patterns, "patterns"))) if patterns else []
        if not self.channels and not self.patterns:
            raise ValueError("from_redis_pubsub: give channels, patterns or both")
        self._pubsub = None
        self._early: List[Any] = []  # messages that arrived with the subscription replies
        super().__init__(decode=decode, count=count, timeout=timeout, url=url,
                         client_kwargs=client_kwargs, client=client, cluster=cluster, start=start,
                         **kwargs)

    def _describe(self):
        return ", ".join(
            [f"channel {c!r}" for c in self.channels] + [f"pattern {p!r}" for p in self.patterns]
        )

    async def _prepare(self):
        self.topology.check_pubsub(self._redis, self)
        self._pubsub = self._redis.pubsub()
        if self.channels:
            await self._pubsub.subscribe(*self.channels)
        if self.patterns:
            await self._pubsub.psubscribe(*self.patterns)
        # SUBSCRIBE is only sent, not answered, until we read: wait for Redis
        # to confirm each subscription so that start() means "listening".
        unconfirmed = len(self.channels) + len(self.patterns)
        deadline = asyncio.get_running_loop().time() + SUBSCRIBE_DEADLINE
        while unconfirmed:
            if asyncio.get_running_loop().time() > deadline:
                raise redis.exceptions.TimeoutError("Redis did not confirm the subscriptions")
            reply = await self._pubsub.get_message(timeout=PUBSUB_POLL)
            if reply is None:
                continue
            if reply["type"] in ("subscribe", "psubscribe"):
                unconfirmed -= 1
            else:
                self._early.append(reply)

    async def _read(self, reader):
        replies, self._early = self._early, []
        # Wait for the first message; then take whatever else has arrived.
        wait = min(self.timeout, PUBSUB_POLL)
        while len(replies) < self.count:
            reply = await self._pubsub.get_message(
                ignore_subscribe_messages=True, timeout=0 if replies else wait
            )
            if reply is None:
                break
            replies.append(reply)
        batch = []
        for reply in replies:
            try:
                message = _pubsub_message(reply, self._encoding)
            except UnicodeDecodeError as exc:
                log.error(
                    "%s: message %r on channel %r cannot be decoded (%s); dropped (Pub/Sub "
                    "keeps nothing to come back to)", self, reply["data"][:80],
                    _text(reply["channel"]), exc,
                )
                continue
            if message is not None:
                batch.append((message, None))
        return batch

    async def _close(self):
        pubsub, self._pubsub = self._pubsub, None
        self._early = []
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except Exception:  # pragma: no cover - closing a dead socket
                pass
        await super()._close()


# --------------------------------------------------------------------------
# 10. The sinks
# --------------------------------------------------------------------------


def _is_redis_value(value):
    """The quick check of ``_redis_value``, for the common case."""
    return type(value) in (str, bytes, int, float)


_PLAIN = {str: str.__str__, bytes: bytes, int: int, float: float}


def _redis_value(value, what):
    """``value`` as redis-py sends it, or a ``TypeError`` naming ``what``.

    Redis stores bytes: ``str`` is encoded as UTF-8, ``int`` and ``float`` are
    written as their decimal text. Anything else must be converted by the
    pipeline (``json.dumps``, ``str``, ...); nothing is pickled implicitly.
    """
    if isinstance(value, (str, bytes, int, float)) and not isinstance(value, bool):
        if type(value) in _PLAIN:
            return value
        # A subclass (an IntEnum, say): its plain value, which hiredis packs.
        return next(plain(value) for kind, plain in _PLAIN.items() if isinstance(value, kind))
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    text, kind = repr(value), "Entry" if isinstance(value, Entry) else type(value).__name__
    raise TypeError(
        f"{what} is a {kind} ({text[:80]}{'...' if len(text) > 80 else ''}); "
        "Redis stores str, bytes, int or float: convert it first, e.g. with json.dumps"
    )


def _references(metadata):
    """The references of our sources that an element's metadata carries."""
    return [m["ref"] for m in metadata if isinstance(m.get("ref"), _Reference)]


def _origin_of(metadata):
    """The upstream entries of an element, for log lines."""
    origins = [str(ref) for ref in _references(metadata)]
    return f" (from {', '.join(origins)})" if origins else ""


def _fail_origins(metadata):
    """Mark the upstream entries of an element that was not written as failed:
    they are never acknowledged, even if another branch lets go of them."""
    for ref in _references(metadata):
        ref.fail()


class _Write:
    """One element on its way to Redis: the command arguments and the
    streamz references it holds until Redis confirms the write."""

    __slots__ = ("element", "key", "value", "metadata", "stored", "acks")

    def __init__(self, element, key, value, metadata):
        self.element = element
        self.key = key
        self.value = value
        self.metadata = metadata
        self.stored = None  # a future, for an element that came through Stream.emit()
        self.acks = ()  # with exactly_once: the upstream entries acknowledged with it

    def settle(self, error=None):
        """Tell whoever emitted the element through ``Stream.emit()`` that it
        is stored (or raise ``error``, why it is not)."""
        if self.stored is not None and not self.stored.done():
            if error is None:
                self.stored.set_result(None)
            else:
                self.stored.set_exception(error)


class _PlainWrites:
    """The write plan of an at-least-once sink: each element's own command,
    sent as it is; its upstream entries are acknowledged by their sources
    once the sink lets go. ``streamz_redis_exactly_once.ExactlyOnce``
    answers the same calls for ``exactly_once=True``; the sink never asks
    which plan it has."""

    def __init__(self, sink):
        self.sink = sink

    def check(self, write):
        """When an element arrives: raise if the plan cannot write it."""

    def prepare(self, writes):
        """Once per round trip, before its first try."""

    async def refused(self, client, writes):
        """For each of ``writes``: an error if the plan refuses it, True if
        it wrote it itself, False to leave it (and what follows it) to the
        round trip's next try, else None: the pipeline sends it."""
        return [None] * len(writes)

    def commands(self, writes):
        """The commands of one round trip, each with how many writes it carries."""
        return self.sink.write_commands(writes)

    splits_replies = False  # else split() says the reply of each write a command carries


class _RedisSink(_RedisNode, Sink):
    """What every Redis sink shares: the connection, pipelining, back-off,
    holding references until Redis confirms, flush() and close().

    A subclass turns an element into a ``_Write`` (``_prepare_write``, which
    raises on an element it cannot write) and a ``_Write`` into its command
    (``write_command``); a round trip sends the commands of every write
    queued, packed by hiredis, in one pipeline. What those commands are, and
    what is refused, the write plan says (``_PlainWrites``, or exactly-once).
    """

    exit_order = 1
    holds_writes = True

    def __init__(
        self,
        upstream,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        url: Optional[str] = None,
        client_kwargs: Optional[Mapping] = None,
        client=None,
        cluster: bool = False,
        exactly_once: bool = False,
        **kwargs,
    ):
        self._connection_args(url, client_kwargs, client, cluster)
        self.max_in_flight = _positive_int(max_in_flight, "max_in_flight")
        self.exactly_once = bool(exactly_once)
        if self.exactly_once:
            self.plan = _optional("streamz_redis_exactly_once", "exactly_once=True").ExactlyOnce(self)
        else:
            self.plan = _PlainWrites(self)
        self._redis = None  # connected lazily, on the loop, by the first write
        self._queue: List[_Write] = []  # writes that wait for the next round trip
        self._writing: List[_Write] = []  # writes of the round trip under way
        self._unconfirmed = 0  # elements received, not yet written or failed
        self._written = self._refused_count = 0
        self._writer = None  # the task that runs round trips while any are queued
        self._backoff = _Backoff()  # shared by successive writers
        self._refusing = False  # Redis refused the last round trip: back off before the next
        self._room = None  # what upstream awaits while max_in_flight are held
        super().__init__(upstream, ensure_io_loop=True, **kwargs)
        self._warn_if_elsewhere()

    def _warn_if_elsewhere(self):
        """A sink given no url= nor client= writes to REDIS_URL (or
        localhost), as every node does; where a source upstream was told to
        read another server, say so once: it is rarely what was meant."""
        if self.server_given:
            return
        for node in _below(self, direction="upstreams"):
            if isinstance(node, _RedisSource) and node.server_given and node.where() != self.where():
                log.warning(
                    "%s: no url= or client= was given, so it writes to %s, while %s upstream "
                    "reads %s; give the sink url= (or client=) to say where it writes",
                    self, self.where(), node, node.where())
                return

    def _describe(self):
        return "<routed>" if callable(self.target) else repr(_text(self.target))

    def metrics(self) -> Dict[str, Any]:
        """A snapshot of this sink's figures, counted since it was made.

        Callable from any thread; it does not wait on Redis.

        Returns
        -------
        dict
            ``written``: elements Redis stored; ``failed``: elements Redis
            refused (or that could not be written by ``close()``);
            ``in_flight``: received and not yet confirmed; ``writing``: of
            those, how many the round trip under way carries.
        """
        return {"written": self._written, "failed": self._refused_count,
                "in_flight": self._unconfirmed, "writing": len(self._writing)}

    @property
    def connected(self) -> bool:
        """Whether the sink holds a connection: from its first write until ``close()``."""
        return self._redis is not None

    # ---- receiving ------------------------------------------------------

    def update(self, x, who=None, metadata=None):
        # Anything wrong with the element raises here, in the emitter's call,
        # before the sink holds a reference to it.
        write = self._prepare_write(x, metadata or [])
        self.plan.check(write)
        self._retain_refs(write.metadata)
        self._queue.append(write)
        self._unconfirmed += 1
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_queued())
            _live_nodes.add(self)
        if getattr(thread_state, "asynchronous", False) and not _references(write.metadata):
            # Through Stream.emit() (a script feeding the pipeline, rather
            # than a source of ours, which streamz's thread-wide flag may
            # cover meanwhile): emit() returns once this element is stored,
            # so the script reads its writes back.
            write.stored = asyncio.get_running_loop().create_future()
            return write.stored
        if self._unconfirmed < self.max_in_flight:
            return None
        # Back-pressure: upstream waits until a round trip makes room.
        if self._room is None:
            self._room = asyncio.get_running_loop().create_future()
        # Shielded: several sources may wait on it, and one that is stopped
        # must not cancel the others' wait.
        return asyncio.shield(self._room)

    def _prepare_write(self, element, metadata):  # pragma: no cover - abstract
        raise NotImplementedError

    def write_command(self, write):  # pragma: no cover - abstract
        """The command that writes ``write``, as an argument list."""
        raise NotImplementedError

    def write_steps(self, write):
        """The commands that write ``write``, in order, all on ``write.key``
        (a counter of several fields, then its EXPIRE): an exactly-once
        script runs them all. One, for most sinks."""
        return [self.write_command(write)]

    def write_commands(self, writes):
        """The commands of ``writes``, in order, each with how many of them
        it carries: one each. (A sink whose writes take several commands
        gives the later ones 0: their error is the writes' before them.)"""
        return [(self.write_command(write), 1) for write in writes]

    def _target(self, element, what):
        """The key or channel for ``element``: fixed, or given by a function."""
        if not callable(self.target):
            return self.target  # checked by __init__
        target = self.target(element)
        if type(target) in (str, bytes):
            return target
        return _key_name(target, f"{self}: the {what} its function returned")

    async def _send(self, commands):
        return await self.topology.pipelined(self._redis, commands)

    # ---- writing --------------------------------------------------------

    async def _write_queued(self):
        """Round trips until nothing is queued: each sends, in one pipeline,
        everything that arrived during the previous one. While Redis refuses
        writes (out of memory, say) the next round trip waits, with back-off,
        also when it is a later writer's first (elements arriving one by one)."""
        backoff = self._backoff
        while self._queue:
            if self._refusing:
                await backoff.wait()
            self._writing, self._queue = self._queue, []
            try:
                refused = self._confirm(self._writing, await self._round_trip(self._writing, backoff))
            except Exception as exc:  # pragma: no cover - a bug here must not pass silently
                log.exception("%s: writing failed", self)
                refused = self._confirm(self._writing, [exc] * len(self._writing))
            self._confirmed(len(self._writing))
            self._writing = []
            self._refusing = bool(refused)
            if refused:
                self._refused(refused, backoff.delay if self._queue else None)
            else:
                backoff.reset()
            self._refused_count += len(refused)  # after the log line: metrics() never runs ahead of it

    async def _round_trip(self, writes, backoff):
        """Send ``writes`` in one pipeline: prepared once through the plan,
        then sent under the back-off; the replies, an exception in place of
        each write refused. Connection errors are retried (an exactly-once
        script sent twice writes once)."""
        # Once, before the first try: a write sent without its entries'
        # acknowledgements (another node held them) must not be sent again
        # with them after a lost reply, which would write it twice.
        self.plan.prepare(writes)
        replies = [None] * len(writes)
        while True:
            try:
                await self._send_unanswered(writes, replies)
                if None not in replies:  # else the plan left some to another try
                    return replies
            except CONNECTION_ERRORS as exc:
                if _cannot_be_retried(exc):
                    return [exc if reply is None else reply for reply in replies]
                log.warning(
                    "%s: Redis is unreachable (%s); %d element(s) wait, retrying in %.1f s",
                    self, _error_text(exc), replies.count(None), backoff.delay,
                )
                await backoff.wait()
            except redis.exceptions.RedisError as exc:
                return [exc if reply is None else reply for reply in replies]

    async def _send_unanswered(self, writes, replies):
        """One try: the writes without a reply yet, less those the plan
        refuses, in one pipeline; their replies go into ``replies``."""
        if self._redis is None:
            self._redis = self._new_client()
        todo = await self._not_refused(writes, replies)
        if not todo:
            return
        commands = self.plan.commands([writes[i] for i in todo])
        self._take_replies(commands, todo, await self._send([c for c, _ in commands]), replies)

    async def _not_refused(self, writes, replies):
        """The indexes of the writes to send now: those without a reply yet
        that the plan neither refuses (its refusal becomes their reply) nor
        leaves to the next try (False: in order, after the others)."""
        todo = [i for i, reply in enumerate(replies) if reply is None]
        later = set()
        for i, refused in zip(todo, await self.plan.refused(self._redis, [writes[i] for i in todo])):
            if refused is False:
                later.add(i)
            else:
                replies[i] = refused
        return [i for i in todo if replies[i] is None and i not in later]

    def _take_replies(self, commands, todo, answers, replies):
        """Each write's reply from the pipeline's ``answers``: a command
        carries ``carried`` writes (0: a later step of the writes before it,
        whose error fails them)."""
        writes, carrying = iter(todo), []
        for (command, carried), answer in zip(commands, answers):
            if carried:
                carrying = [next(writes) for _ in range(carried)]
                if self.plan.splits_replies:  # a reply for each write the command carries
                    for i, reply in zip(carrying, self.plan.split(command, answer, carried)):
                        replies[i] = True if reply is None else reply  # None: no reply yet
                    continue
                for i in carrying:
                    replies[i] = True if answer is None else answer
            elif isinstance(answer, Exception):
                for i in carrying:
                    replies[i] = answer

    def _confirm(self, writes, replies):
        """Let go of each write Redis stored (acknowledging with it the
        entries the plan wrote with it); fail the origins of the others.
        Returns ``(write, error)`` of each refused."""
        refused = []
        for write, reply in zip(writes, replies):
            if isinstance(reply, Exception):
                _fail_origins(write.metadata)
                refused.append((write, reply))
                write.settle(reply)
            else:
                for ack in write.acks:
                    ack.settle()
                self._release_refs(write.metadata)
                write.settle()
        self._written += len(writes) - len(refused)
        return refused

    def _refused(self, refused, retry_in):
        """One log line for the writes of a round trip that Redis refused:
        their upstream entries are not acknowledged (they stay pending)."""
        write, exc = refused[0]
        log.error(
            "%s: Redis refused %d write(s) (%s), the first %s%s to %r; not acknowledged%s",
            self, len(refused), _error_text(exc), _name_of(write.element),
            _origin_of(write.metadata), _text(write.key),
            "" if retry_in is None else f"; next round trip in {retry_in:.1f} s",
        )
        for write, exc in refused[1:]:
            log.debug("%s: also refused: %s%s (%s)", self, _name_of(write.element),
                      _origin_of(write.metadata), _error_text(exc))

    def _confirmed(self, n):
        self._unconfirmed -= n
        if self._room is not None and self._unconfirmed < self.max_in_flight:
            room, self._room = self._room, None
            if not room.done():
                room.set_result(None)

    # ---- flush and close, from any thread -------------------------------

    def flush(self) -> Optional[Awaitable[None]]:
        """Wait until Redis has confirmed (or refused) every element received so far.

        Blocks in streamz's default mode; inside the event loop it returns an
        awaitable.

        Returns
        -------
        awaitable or None
            ``None`` in streamz's default mode, once flushed; inside the event
            loop, an awaitable that is done once flushed.
        """
        return self._on_loop(self._flush)

    def close(self, timeout: float = FLUSH_DEADLINE) -> Optional[Awaitable[None]]:
        """Write what is held, then close the connection.

        Elements still unwritten after ``timeout`` are logged and their
        upstream entries stay unacknowledged. A later element opens a new
        connection. A ``client`` given to the sink is left open. Blocks in
        streamz's default mode; inside the event loop it returns an
        awaitable.

        Parameters
        ----------
        timeout : float
            The longest it waits for Redis to confirm what is held, in
            seconds (default ``FLUSH_DEADLINE``, 5 s).

        Returns
        -------
        awaitable or None
            ``None`` in streamz's default mode, once closed; inside the event
            loop, an awaitable that is done once closed.
        """
        return self._on_loop(self._close, timeout)

    def finish_at_exit(self, left):
        """Python is exiting: close within ``left`` seconds, or say what is lost."""
        if not self._finish_within(left, self._close) and self._unconfirmed:
            log.error("%s: %d element(s) not written at exit; their upstream entries "
                      "are not acknowledged", self, self._unconfirmed)

    def _loop_ended(self):
        if self._unconfirmed:
            log.warning("%s: its event loop has ended; %d element(s) not written",
                        self, self._unconfirmed)

    async def _flush(self):
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def _close(self, timeout):
        try:
            await asyncio.wait_for(self._flush(), timeout)
        except asyncio.TimeoutError:
            await self._abandon(timeout)
        own, self._redis = self._redis, None
        _live_nodes.discard(self)
        if own is not None and own is not self.client:
            try:
                await own.aclose()
            except Exception:  # pragma: no cover - closing a dead socket
                pass

    async def _abandon(self, timeout):
        """close() ran out of time: what is held is not written."""
        self._writer.cancel()
        try:
            await self._writer
        except asyncio.CancelledError:
            pass
        left = self._writing + self._queue
        self._writing, self._queue = [], []
        for write in left:
            _fail_origins(write.metadata)
            write.settle(TimeoutError(f"{self}: not written within {timeout:.1f} s of close()"))
        self._refused_count += len(left)
        self._confirmed(len(left))
        log.error(
            "%s: %d element(s) not written within %.1f s of close(); their upstream "
            "entries are not acknowledged", self, len(left), timeout,
        )


@Stream.register_api()
class to_redis_stream(_RedisSink):
    """Add each element to a Redis Stream (XADD).

    A mapping becomes the entry's fields. Any other element raises
    ``TypeError``, unless ``field`` is given: then it is stored as
    ``{field: element}``. Field names and values must be ``str``, ``bytes``,
    ``int`` or ``float``; anything else (``None``, ``bool``, a list, ...) raises
    ``TypeError`` naming the field; nothing is pickled implicitly.

    Writes are pipelined: while one round trip is under way, elements queue,
    and the next round trip sends them all. The sink holds each element's
    streamz references until Redis has confirmed its write, so an upstream
    consumer-group entry is acknowledged only once its result is stored
    (**at-least-once**). While fewer than ``max_in_flight`` elements await
    Redis, ``update()`` returns at once (an emit does not wait for its own
    write); beyond that it returns a future that upstream awaits until a
    round trip makes room (back-pressure).

    A lost connection is retried with capped back-off (0.1 s doubling to
    5 s) for as long as the sink is open; a batch that was sent when the
    connection dropped is sent again, so an entry may be added twice. A write
    Redis refuses (a key of the wrong type, out of memory) is logged on the
    ``streamz_redis`` logger with the element named, and its upstream
    consumer-group entries are not acknowledged: they stay pending.

    ``flush()`` waits for every write so far; ``close()`` flushes and closes
    the connection. Shut a pipeline down source first: ``source.stop()``, then
    ``sink.close()``.

    Parameters
    ----------
    upstream : streamz.Stream
        The stream whose elements are written: ``stream.to_redis_stream(...)``
        gives it.
    stream : str or callable
        The stream name, or a function of the element that returns it (for
        routing elements to several streams).
    maxlen : int, optional
        Trim the stream to about this many entries on each XADD (MAXLEN).
    approximate : bool
        Trim with ``~`` (default), which Redis does far more cheaply; the
        stream may then be slightly longer than ``maxlen``.
    field : str, optional
        The field under which an element that is not a mapping is stored.
    max_in_flight : int
        How many elements may await Redis before upstream must wait.
    url : str, optional
        Redis URL; default the ``REDIS_URL`` environment variable, else
        ``redis://localhost:6379/0``, as for every node: a sink does not
        take its source's server. When neither ``url`` nor ``client`` is
        given and a Redis source upstream was told another server, the sink
        logs a WARNING saying so when it is made. It connects at its first
        write.
    client_kwargs : dict, optional
        Extra keyword arguments for ``redis.asyncio.Redis``.
    client : redis.asyncio.Redis, optional
        A ready client; wins over ``url`` and ``client_kwargs``, and is not
        closed by ``close()``. A Redis Cluster or Sentinel client works too.
    cluster : bool
        ``True`` when ``url`` names a node of a Redis Cluster.
    exactly_once : bool
        Write each element and acknowledge the consumer-group entries (or
        reliable-list items) it came from in one script: after a crash the
        output holds each input once. Raises at the first element if an
        entry also reaches another sink; refuses a source on another server.
    **kwargs
        For ``streamz.Stream``: ``stream_name``.

    Examples
    --------
    >>> source = Stream.from_redis_consumer_group("orders", "billing", "worker-1")  # doctest: +SKIP
    >>> invoices = source.map(lambda e: {"order": e.id, "total": total(e)})  # doctest: +SKIP
    >>> invoices.to_redis_stream("invoices")  # doctest: +SKIP
    >>> source.start()  # doctest: +SKIP
    """

    def __init__(
        self, upstream: Stream, stream: Union[str, Callable[[Any], str]], *, maxlen: Optional[int] = None,
        approximate: bool = True, field: Optional[str] = None,
        max_in_flight: int = MAX_IN_FLIGHT, url: Optional[str] = None,
        client_kwargs: Optional[Mapping[str, Any]] = None, client: Optional[_AsyncClient] = None,
        cluster: bool = False, exactly_once: bool = False, **kwargs: Any,
    ) -> None:
        if not callable(stream):
            _key_name(stream, "stream")
        if maxlen is not None and (not isinstance(maxlen, int) or maxlen < 0):
            raise ValueError(f"maxlen must be a non-negative integer, not {maxlen!r}")
        self.target = stream
        self.maxlen = None if maxlen is None else int(maxlen)
        self.approximate = approximate
        self.field = field
        super().__init__(upstream, max_in_flight=max_in_flight, url=url,
                         client_kwargs=client_kwargs, client=client, cluster=cluster,
                         exactly_once=exactly_once, **kwargs)

    def _prepare_write(self, element, metadata):
        if type(element) is dict or isinstance(element, Mapping):
            if not element:
                raise ValueError(f"{self}: an empty mapping cannot be a stream entry")
            fields = dict(element)
            if not all(_is_redis_value(n) and _is_redis_value(v) for n, v in fields.items()):
                fields = {
                    _redis_value(n, f"field name {n!r}"): _redis_value(v, f"field {n!r}")
                    for n, v in fields.items()
                }
        elif self.field is not None:
            fields = {self.field: _redis_value(element, f"field {self.field!r}")}
        else:
            raise TypeError(
                f"{self}: a stream entry needs a mapping of fields, not a "
                f"{type(element).__name__} ({_name_of(element)}); map it to a dict "
                "first, or give field=... to store each element as one field"
            )
        return _Write(element, self._target(element, "stream"), fields, metadata)

    def write_command(self, write):
        trim = [] if self.maxlen is None else ["MAXLEN", "~" if self.approximate else "=", self.maxlen]
        return ["XADD", write.key, *trim, "*", *[part for pair in write.value.items() for part in pair]]


@Stream.register_api()
class to_redis_list(_RedisSink):
    """Push each element onto a Redis list (RPUSH, or LPUSH).

    Elements must be ``str``, ``bytes``, ``int`` or ``float``; anything else
    raises ``TypeError``. Pipelining, holding references until Redis confirms,
    back-pressure, retries and failures are as for ``to_redis_stream``; a
    retried batch may push an element twice.

    Parameters
    ----------
    upstream : streamz.Stream
        The stream whose elements are written: ``stream.to_redis_list(...)``
        gives it.
    key : str or callable
        The list key, or a function of the element that returns it.
    side : {"right", "left"}
        ``"right"`` (default) appends with RPUSH, so that ``from_redis_list``
        (which pops from the left) reads in order; ``"left"`` uses LPUSH.
    max_in_flight, url, client_kwargs, client, cluster, exactly_once : optional
        As for ``to_redis_stream``: an int, a URL, a dict, a client, and two bools.
    **kwargs
        As for ``to_redis_stream``.

    Examples
    --------
    >>> Stream.from_redis_list("jobs").map(str.upper).to_redis_list("done")  # doctest: +SKIP
    """

    def __init__(
        self, upstream: Stream, key: Union[str, Callable[[Any], str]], *, side: str = "right",
        max_in_flight: int = MAX_IN_FLIGHT, url: Optional[str] = None,
        client_kwargs: Optional[Mapping[str, Any]] = None, client: Optional[_AsyncClient] = None,
        cluster: bool = False, exactly_once: bool = False, **kwargs: Any,
    ) -> None:
        if not callable(key):
            _key_name(key, "key")
        if side not in ("right", "left"):
            raise ValueError(f'side must be "right" or "left", not {side!r}')
        self.target = key
        self.side = side
        super().__init__(upstream, max_in_flight=max_in_flight, url=url,
                         client_kwargs=client_kwargs, client=client, cluster=cluster,
                         exactly_once=exactly_once, **kwargs)

    def _prepare_write(self, element, metadata):
        value = _redis_value(element, "the element")
        return _Write(element, self._target(element, "key"), value, metadata)

    def write_command(self, write):
        return ["RPUSH" if self.side == "right" else "LPUSH", write.key, write.value]

    def write_commands(self, writes):
        commands = []  # consecutive pushes to one key merged into one command
        for write in writes:
            if commands and commands[-1][0][1] == write.key:
                command, carried = commands[-1]
                command.append(write.value)
                commands[-1] = (command, carried + 1)
            else:
                commands.append((self.write_command(write), 1))
        return commands


@Stream.register_api()
class to_redis_pubsub(_RedisSink):
    """Publish each element on a Redis Pub/Sub channel (PUBLISH).

    Elements must be ``str``, ``bytes``, ``int`` or ``float``; anything else
    raises ``TypeError``. Pub/Sub is at-most-once on the receiving side: a
    message is "written" once Redis has accepted it, whether or not anyone
    was subscribed. Pipelining, back-pressure and retries are as for
    ``to_redis_stream``.

    Parameters
    ----------
    upstream : streamz.Stream
        The stream whose elements are written: ``stream.to_redis_pubsub(...)``
        gives it.
    channel : str or callable
        The channel, or a function of the element that returns it.
    max_in_flight, url, client_kwargs, client, cluster : optional
        As for ``to_redis_stream``: an int, a URL, a dict, a client, and a bool.
    **kwargs
        As for ``to_redis_stream``.

    Examples
    --------
    >>> source.map(json.dumps).to_redis_pubsub("events")  # doctest: +SKIP
    """

    def __init__(
        self, upstream: Stream, channel: Union[str, Callable[[Any], str]], *,
        max_in_flight: int = MAX_IN_FLIGHT, url: Optional[str] = None,
        client_kwargs: Optional[Mapping[str, Any]] = None, client: Optional[_AsyncClient] = None,
        cluster: bool = False, **kwargs: Any,
    ) -> None:
        if kwargs.get("exactly_once"):
            raise ValueError("exactly_once: Pub/Sub keeps nothing that a script could write with the acks")
        if not callable(channel):
            _key_name(channel, "channel")
        self.target = channel
        super().__init__(upstream, max_in_flight=max_in_flight, url=url,
                         client_kwargs=client_kwargs, client=client, cluster=cluster, **kwargs)

    def _prepare_write(self, element, metadata):
        value = _redis_value(element, "the element")
        return _Write(element, self._target(element, "channel"), value, metadata)

    def write_command(self, write):
        return ["PUBLISH", write.key, write.value]

    async def _send(self, commands):
        return await self.topology.publish(self._redis, commands)


# ---- Sinks of keys: hashes, keys, sorted sets, sets, any command ---------


def _ttl(ttl):
    """``ttl=``: None, or a whole number of seconds above 0."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, numbers.Integral) or ttl <= 0:
        raise ValueError(f"ttl must be a whole number of seconds above 0, not {ttl!r}")
    return int(ttl)


def _plain(value, what, name=None):
    """``_redis_value(value, what)``, at no cost for a plain str, bytes, int or
    float; ``what`` (with ``name``, if given) is only formatted for an error."""
    if type(value) in _PLAIN:
        return value
    return _redis_value(value, what if name is None else f"{what} {name!r}")


def _number(value, what, name=None):
    """An increment, or a score: an int (within Redis's 64 bits) or a finite
    float; anything else raises naming ``what`` (and ``name``)."""
    kind = type(value)
    if (kind is int and -2**63 <= value < 2**63) or (kind is float and math.isfinite(value)):
        return value
    if name is not None:
        what = f"{what} {name!r}"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if not -2**63 <= value < 2**63:
            raise ValueError(f"{what} is {value}, beyond Redis's 64-bit integers")
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{what} is {value!r}; Redis adds finite numbers only")
        return float(value)
    raise TypeError(f"{what} is a {type(value).__name__} ({_name_of(value)}), not a number "
                    "(an int or a float)")


def _adds(number):
    """The suffix of the command that adds ``number``: INCRBY or INCRBYFLOAT."""
    return "FLOAT" if type(number) is float else ""


class _KeySink(_RedisSink):
    """What the sinks of keys share. An element's key is ``key`` if it is a
    str, the return of ``key(element)`` if it is a function, and otherwise
    (``key=None``) the element is a ``(key, value)`` tuple. ``ttl`` adds an
    EXPIRE of the key after each write, in the same round trip. A subclass
    turns a value into what its commands send (``_value``) and that into its
    commands on the key (``_steps``)."""

    shape = "value"  # what a value is, for the error of a wrong element

    def __init__(
        self, upstream: Stream, key: Union[str, bytes, Callable[[Any], Union[str, bytes]], None] = None, *,
        ttl: Optional[int] = None, increment: bool = False,
        max_in_flight: int = MAX_IN_FLIGHT, url: Optional[str] = None,
        client_kwargs: Optional[Mapping[str, Any]] = None, client: Optional[_AsyncClient] = None,
        cluster: bool = False, exactly_once: bool = False, **kwargs: Any,
    ) -> None:
        if key is not None and not callable(key):
            _key_name(key, "key")
        self.target = key
        self.ttl = _ttl(ttl)
        self.increment = bool(increment)
        super().__init__(upstream, max_in_flight=max_in_flight, url=url,
                         client_kwargs=client_kwargs, client=client, cluster=cluster,
                         exactly_once=exactly_once, **kwargs)

    def _describe(self):
        return "<(key, value) elements>" if self.target is None else super()._describe()

    def _prepare_write(self, element, metadata):
        if self.target is not None:
            return _Write(element, self._target(element, "key"), self._checked(element), metadata)
        if type(element) is not tuple or len(element) != 2:  # a list is a value (members, a pair)
            raise TypeError(f"{self}: with no key given, an element is a (key, {self.shape}) "
                            f"tuple, not {_name_of(element)}")
        key, value = element
        if type(key) not in (str, bytes):
            _key_name(key, f"{self}: the key of an element")
        return _Write(element, key, self._checked(value), metadata)

    def _checked(self, value):
        """``_value(value)``; its error names this sink."""
        try:
            return self._value(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{self}: {exc}") from None

    def _value(self, value):  # pragma: no cover - abstract
        raise NotImplementedError

    def _steps(self, key, value):  # pragma: no cover - abstract
        raise NotImplementedError

    def _merged(self, key, values):  # pragma: no cover - abstract
        """The commands of consecutive writes of ``values`` to ``key``, in
        fewer commands where the result is the same (one HSET, SADD or ZADD
        for all; integer increments of one field added up)."""
        raise NotImplementedError

    def _expiring(self, key, steps):
        """``steps``, then the EXPIRE of ``ttl``."""
        if self.ttl is not None:
            steps.append(["EXPIRE", key, self.ttl])
        return steps

    def write_steps(self, write):
        return self._expiring(write.key, self._steps(write.key, write.value))

    def write_commands(self, writes):
        """Consecutive writes to one key go together (``_merged``), with one
        EXPIRE: one of their commands refused fails them all (they share the
        key: WRONGTYPE, say), as consecutive pushes of a list sink do."""
        commands, start = [], 0
        while start < len(writes):
            key, end = writes[start].key, start + 1
            while end < len(writes) and writes[end].key == key:
                end += 1
            if end - start == 1:
                steps = self.write_steps(writes[start])
            else:
                steps = self._expiring(key, self._merged(key, [write.value for write in writes[start:end]]))
            commands.append((steps[0], end - start))
            commands.extend((step, 0) for step in steps[1:])
            start = end
        return commands


# The longest HSET, ZADD or SADD a sink of keys sends, in arguments after the
# key: a longer element takes several, so that an exactly-once script can
# pass each to Redis (Lua's unpack() gives at most about 8,000 values).
KEY_COMMAND_ARGUMENTS = 2000


def _in_pieces(name, key, parts):
    """``name key *parts`` as commands of at most ``KEY_COMMAND_ARGUMENTS``
    arguments after the key (an even number: pairs stay together)."""
    size = KEY_COMMAND_ARGUMENTS
    return [[name, key, *parts[at:at + size]] for at in range(0, len(parts), size)]


def _added_up(pairs):
    """Increments ``(name, number)`` with the integers of each name added up,
    at its first place (exact, and the same result); a name that also takes
    a float keeps each of its increments, in order (Redis rounds each, and an
    integer after a fraction fails as it would have)."""
    pairs = list(pairs)
    floating = {name for name, number in pairs if type(number) is not int}
    sums, added = {}, []
    for name, number in pairs:
        if name in floating:
            added.append([name, number])
        elif name in sums:
            sums[name][1] += number
        else:
            sums[name] = [name, number]
            added.append(sums[name])
    return [tuple(pair) for pair in added]


@Stream.register_api()
class to_redis_hash(_KeySink):
    """Write each element, a mapping of field -> value, into a Redis hash (HSET).

    With ``increment=True`` it adds each value to its field (HINCRBY,
    HINCRBYFLOAT for a float): counters.

    Field names and values must be ``str``, ``bytes``, ``int`` or ``float``;
    with ``increment=True`` each value must be an int (within 64 bits) or a
    finite float. Anything else raises ``TypeError`` (or ``ValueError``)
    naming the sink and the field, in the emit that brought it: the upstream
    entry is not acknowledged. Pipelining, holding references until Redis
    confirms, back-pressure, retries and failures are as for
    ``to_redis_stream``: at-least-once, so a retried round trip may add an
    increment twice, unless ``exactly_once=True``.

    Parameters
    ----------
    upstream : streamz.Stream
        The stream whose elements are written: ``stream.to_redis_hash(...)``
        gives it.
    key : str or callable, optional
        The hash's key, or a function of the element that returns it. Without
        it, each element is a ``(key, mapping)`` tuple.
    ttl : int, optional
        Seconds: an EXPIRE of the key after each write, in the same round trip.
    increment : bool
        Add the values to the fields instead of setting them. A field that
        holds a fraction takes only floats (Redis's HINCRBY refuses it).
    max_in_flight, url, client_kwargs, client, cluster : optional
        As for ``to_redis_stream``: an int, a URL, a dict, a client, and a bool.
    exactly_once : bool
        Write each element, increments included, and acknowledge the entries
        it came from in one script: through crashes and restarts, a counter
        fed by a consumer group counts each entry once. An element whose
        field holds no number Redis adds to is refused with nothing of it
        written; the elements beside it are written.
    **kwargs
        As for ``to_redis_stream``.

    Examples
    --------
    >>> source = Stream.from_redis_consumer_group("views", "counting", "c-1")  # doctest: +SKIP
    >>> source.map(lambda e: {e.fields["page"]: 1}).to_redis_hash(  # doctest: +SKIP
    ...     "views:per-page", increment=True, exactly_once=True)
    """

    shape = "mapping"

    def _value(self, mapping):
        if not isinstance(mapping, Mapping) or not mapping:
            raise TypeError(f"an element is a non-empty mapping of field -> value, not "
                            f"{_name_of(mapping)}")
        if self.increment:
            return [(_plain(field, "field name", field), _number(value, "the increment of field", field))
                    for field, value in mapping.items()]
        return [part for field, value in mapping.items()
                for part in (_plain(field, "field name", field), _plain(value, "field", field))]

    def _steps(self, key, value):
        if self.increment:
            return [[f"HINCRBY{_adds(n)}", key, field, n] for field, n in value]
        return _in_pieces("HSET", key, value)

    def _merged(self, key, values):
        if self.increment:
            return self._steps(key, _added_up(pair for value in values for pair in value))
        return _in_pieces("HSET", key, [part for value in values for part in value])


@Stream.register_api()
class to_redis_key(_KeySink):
    """Set a Redis key to each element (SET, with EX when ``ttl`` is given).

    With ``increment=True`` it adds each element to the number the key holds
    (INCRBY, INCRBYFLOAT for a float): a cache, or a counter.

    Values must be ``str``, ``bytes``, ``int`` or ``float``; increments an
    int or a finite float. Errors, pipelining and guarantees are as for
    ``to_redis_hash``.

    Parameters
    ----------
    upstream : streamz.Stream
        The stream whose elements are written: ``stream.to_redis_key(...)``
        gives it.
    key : str or callable, optional
        The key, or a function of the element that returns it. Without it,
        each element is a ``(key, value)`` tuple.
    ttl : int, optional
        Seconds the key lives after each write.
    increment : bool
        Add each element to the key's number instead of setting it.
    max_in_flight, url, client_kwargs, client, cluster, exactly_once : optional
        As for ``to_redis_hash``: an int, a URL, a dict, a client, and two bools.
    **kwargs
        As for ``to_redis_hash``.

    Examples
    --------
    >>> source.map(lambda e: (f"user:{e.fields['id']}:seen", e.id)).to_redis_key(  # doctest: +SKIP
    ...     ttl=3600)
    """

    def _value(self, value):
        if self.increment:
            return _number(value, "the increment")
        return _plain(value, "the value")

    def _steps(self, key, value):
        if self.increment:
            return [[f"INCRBY{_adds(value)}", key, value]]
        return [["SET", key, value, *(() if self.ttl is None else ("EX", self.ttl))]]

    def _expiring(self, key, steps):
        return super()._expiring(key, steps) if self.increment else steps  # SET ... EX

    def _merged(self, key, values):
        if self.increment:
            return [step for _, n in _added_up(("", n) for n in values) for step in self._steps(key, n)]
        return self._steps(key, values[-1])


@Stream.register_api()
class to_redis_sorted_set(_KeySink):
    """Add each element, members and their scores, to a Redis sorted set (ZADD).

    An element is a ``(member, score)`` pair or a mapping of member ->
    score. With ``increment=True`` it adds each score to its member's
    (ZINCRBY): leaderboards.

    Members must be ``str``, ``bytes``, ``int`` or ``float``; scores an int
    (within 64 bits) or a finite float. Errors, pipelining and guarantees are
    as for ``to_redis_hash``.

    Parameters
    ----------
    upstream : streamz.Stream
        The stream whose elements are written: ``stream.to_redis_sorted_set(...)``
        gives it.
    key : str or callable, optional
        The sorted set's key, or a function of the element that returns it.
        Without it, each element is a ``(key, (member, score))`` tuple (or
        ``(key, mapping)``).
    ttl : int, optional
        As for ``to_redis_hash``.
    increment : bool
        Add the scores to the members' instead of setting them.
    max_in_flight, url, client_kwargs, client, cluster, exactly_once : optional
        As for ``to_redis_hash``: an int, a URL, a dict, a client, and two bools.
    **kwargs
        As for ``to_redis_hash``.

    Examples
    --------
    >>> source.map(lambda e: (e.fields["player"], int(e.fields["points"]))).to_redis_sorted_set(  # doctest: +SKIP
    ...     "leaderboard", increment=True, exactly_once=True)
    """

    shape = "(member, score) pair, or mapping"

    def _value(self, value):
        if isinstance(value, Mapping) and value:
            pairs = value.items()
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            pairs = [value]
        else:
            raise TypeError(f"an element is a (member, score) pair or a non-empty mapping "
                            f"of member -> score, not {_name_of(value)}")
        return [(_plain(member, "member", member), _number(score, "the score of member", member))
                for member, score in pairs]

    def _steps(self, key, pairs):
        if self.increment:
            return [["ZINCRBY", key, score, member] for member, score in pairs]
        return _in_pieces("ZADD", key, [part for member, score in pairs for part in (score, member)])

    def _merged(self, key, values):
        pairs = [pair for value in values for pair in value]
        return self._steps(key, _added_up(pairs) if self.increment else pairs)


@Stream.register_api()
class to_redis_set(_KeySink):
    """Add each element to a Redis set (SADD): "seen" sets.

    An element is a member (``str``, ``bytes``, ``int`` or ``float``), or a
    list, tuple or set of members added together. Errors, pipelining and
    guarantees are as for ``to_redis_hash``.

    Parameters
    ----------
    upstream : streamz.Stream
        The stream whose elements are written: ``stream.to_redis_set(...)``
        gives it.
    key : str or callable, optional
        The set's key, or a function of the element that returns it. Without
        it, each element is a ``(key, member)`` tuple (or ``(key, members)``).
    ttl : int, optional
        As for ``to_redis_hash``.
    max_in_flight, url, client_kwargs, client, cluster, exactly_once : optional
        As for ``to_redis_hash``: an int, a URL, a dict, a client, and two bools.
    **kwargs
        As for ``to_redis_hash``.

    Examples
    --------
    >>> source.map(lambda e: e.fields["user"]).to_redis_set("users:seen", ttl=86400)  # doctest: +SKIP
    """

    shape = "member"

    def __init__(
        self, upstream: Stream, key: Union[str, bytes, Callable[[Any], Union[str, bytes]], None] = None, *,
        ttl: Optional[int] = None,
        max_in_flight: int = MAX_IN_FLIGHT, url: Optional[str] = None,
        client_kwargs: Optional[Mapping[str, Any]] = None, client: Optional[_AsyncClient] = None,
        cluster: bool = False, exactly_once: bool = False, **kwargs: Any,
    ) -> None:
        if "increment" in kwargs:
            raise TypeError("increment: a set holds no numbers to add to; count with "
                            "to_redis_hash or to_redis_sorted_set (increment=True)")
        super().__init__(upstream, key, ttl=ttl, max_in_flight=max_in_flight, url=url,
                         client_kwargs=client_kwargs, client=client, cluster=cluster,
                         exactly_once=exactly_once, **kwargs)

    def _value(self, value):
        if isinstance(value, (list, tuple, set, frozenset)):
            if not value:
                raise ValueError(f"an empty {type(value).__name__} adds no member")
            return [_plain(member, "a member") for member in value]
        return [_plain(value, "the member")]

    def _steps(self, key, members):
        return _in_pieces("SADD", key, members)

    def _merged(self, key, values):
        return _in_pieces("SADD", key, [member for members in values for member in members])


# Commands a pipeline of writes cannot carry: they block the connection, or
# change its state for the commands after them.
_NOT_A_WRITE = frozenset("""
    MULTI EXEC DISCARD WATCH UNWATCH SELECT AUTH HELLO RESET QUIT CLIENT MONITOR SYNC PSYNC
    SUBSCRIBE PSUBSCRIBE SSUBSCRIBE UNSUBSCRIBE PUNSUBSCRIBE SUNSUBSCRIBE READONLY READWRITE
    BLPOP BRPOP BLMOVE BRPOPLPUSH BLMPOP BZPOPMIN BZPOPMAX BZMPOP WAIT WAITAOF
""".split())


@Stream.register_api()
class to_redis_command(_RedisSink):
    """Send each element, a command such as ``("PFADD", "visitors", user)``.

    It goes in the sinks' pipeline: the way to every write the other sinks
    do not wrap.

    The command's name comes first, then its arguments (``str``, ``bytes``,
    ``int`` or ``float``). A command that blocks or changes the connection
    (``MULTI``, ``SUBSCRIBE``, ``BLPOP``, ``SELECT``, ...) raises
    ``ValueError``. Pipelining, holding references until Redis confirms,
    back-pressure, retries and failures are as for ``to_redis_stream``; the
    reply is not kept.

    With ``exactly_once=True`` the command runs in the script that
    acknowledges its entries, as with the other sinks. A script must name its
    keys, and the sink takes the command's first argument for its one key:
    that holds for commands on one key (``PFADD``, ``SETBIT``, ``GEOADD``,
    ``XADD``, ``JSON.SET``, ...); a command without arguments is refused, and
    one that writes several keys (``MSET``, ``SMOVE``) works on one server
    but is refused by a Redis Cluster unless its keys share a slot.

    Parameters
    ----------
    upstream : streamz.Stream
        The stream whose elements are written: ``stream.to_redis_command(...)``
        gives it.
    max_in_flight, url, client_kwargs, client, cluster, exactly_once : optional
        As for ``to_redis_stream``: an int, a URL, a dict, a client, and two bools.
    **kwargs
        As for ``to_redis_stream``.

    Examples
    --------
    >>> source.map(lambda e: ("PFADD", "visitors", e.fields["user"])).to_redis_command()  # doctest: +SKIP
    """

    def __init__(
        self, upstream: Stream, *,
        max_in_flight: int = MAX_IN_FLIGHT, url: Optional[str] = None,
        client_kwargs: Optional[Mapping[str, Any]] = None, client: Optional[_AsyncClient] = None,
        cluster: bool = False, exactly_once: bool = False, **kwargs: Any,
    ) -> None:
        self.target = None
        super().__init__(upstream, max_in_flight=max_in_flight, url=url,
                         client_kwargs=client_kwargs, client=client, cluster=cluster,
                         exactly_once=exactly_once, **kwargs)

    def _describe(self):
        return "<commands>"

    def _prepare_write(self, element, metadata):
        if not isinstance(element, (tuple, list)) or not element or not isinstance(element[0], str):
            raise TypeError(f"{self}: an element is a command, a tuple such as ('PFADD', 'visitors', "
                            f"'alice') whose first item is its name, not {_name_of(element)}")
        name = element[0].upper()
        if name in _NOT_A_WRITE:
            raise ValueError(f"{self}: {name} blocks or changes the connection; it cannot go in a "
                             "pipeline of writes")
        args = [arg if type(arg) in _PLAIN else _redis_value(arg, f"{self}: argument {i} of {name}")
                for i, arg in enumerate(element[1:], 1)]
        return _Write(element, args[0] if args else None, [name, *args], metadata)

    def write_command(self, write):
        return write.value


# --------------------------------------------------------------------------
# 11. The command line: python -m streamz_redis --help
# --------------------------------------------------------------------------


def main(argv=None):
    """``python -m streamz_redis`` (or the ``streamz-redis`` command): the
    operator's command line, which lives in ``streamz_redis_operations`` (see
    its ``main``)."""
    return _optional("streamz_redis_operations", "the command line").main(argv)


if __name__ == "__main__":
    sys.exit(main())
