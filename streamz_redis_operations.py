"""Operating streams for streamz-redis: housekeeping, and the operator's
command line.

``streamz_redis`` imports this module when a consumer group is made with
``trim_acknowledged`` or ``remove_idle_consumers``, and for
``python -m streamz_redis`` (or ``streamz_redis.main``); never otherwise.

- ``Housekeeper``: a consumer group's housekeeping, in place of
  ``streamz_redis._NoHousekeeping``: trimming each stream up to the oldest
  entry some group still needs (on the figures' beat, about once a second),
  and removing idle consumers that hold nothing (at the end of each claim
  sweep).
- The command line (``main``): ``info``, ``pending``, ``dead-letters``,
  ``redrive``, ``tail`` and ``trim``.
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import time

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from streamz_redis import (
    CONNECTION_ERRORS, DEFAULT_URL, __version__, _check_url, _error_text, _group_lag, _raw_reply,
    _safe_url, _stream_entries, _text, log,
)

__all__ = ["Housekeeper", "main"]

# How long one read of `tail` waits: SIGINT is honoured between reads.
TAIL_BLOCK = 0.5

# The largest --count: Redis's COUNT is a signed 64-bit number.
COUNT_MAX = 2**63 - 1

# The exit code of a command interrupted by Ctrl-C (128 + SIGINT, as shells say).
EXIT_INTERRUPTED = 128 + signal.SIGINT


# --------------------------------------------------------------------------
# Housekeeping: trimming, and removing idle consumers
# --------------------------------------------------------------------------

# Trim a stream up to the oldest entry that some group still needs: an entry
# pending in a group, or the first entry after a group's last-delivered-id.
# One script, so that no group moves (or appears) between the reckoning and
# the XTRIM. Ids are compared as numbers written in decimal: by length, then
# as text. Returns {minimum id kept, entries trimmed, the group that needs it},
# or nil where the stream has no group (nothing says what may go).
TRIM_TO_OLDEST_NEEDED = """
local function before(a, b)
    local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
    local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
    if a_ms ~= b_ms then
        return #a_ms < #b_ms or (#a_ms == #b_ms and a_ms < b_ms)
    end
    return #a_seq < #b_seq or (#a_seq == #b_seq and a_seq < b_seq)
end
local keep, needed_by
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    local last = info['last-delivered-id']
    local next_entry = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)[1]
    local needed = next_entry and next_entry[1] or last
    if info['pending'] > 0 then
        local oldest = redis.call('XPENDING', KEYS[1], info['name'])[2]
        if before(oldest, needed) then needed = oldest end
    end
    if not keep or before(needed, keep) then keep, needed_by = needed, info['name'] end
end
if not keep then return nil end
return {keep, redis.call('XTRIM', KEYS[1], 'MINID', keep), needed_by}
"""


async def _trim_to_oldest_needed(client, stream):
    """XTRIM ``stream`` with MINID up to the oldest entry some group still
    needs, never further: ``(id kept from, entries trimmed, group)``, or None
    where the stream has no group."""
    reply = await client.eval(TRIM_TO_OLDEST_NEEDED, 1, stream)
    if not reply:
        return None
    keep, trimmed, group = reply
    return _text(keep), trimmed, _text(group)


# remove_idle_consumers: delete the group's consumers idle for at least
# ARGV[2] ms that hold no pending entry, other than the caller (ARGV[3]) and
# the live ones (ARGV[5..], those with a connection named after them). One
# script, so that a consumer cannot read an entry between the check and XGROUP
# DELCONSUMER, which would drop that entry from the group for good. Before
# Redis 7.2 (no 'inactive' field) a blocked read that returns nothing does
# not reset 'idle', so a live consumer of an idle stream looks idle: there,
# nothing is removed unless the live ones are known (ARGV[4] is '1').
REMOVE_IDLE_CONSUMERS = """
local removed, live = {}, {}
for i = 5, #ARGV do live[ARGV[i]] = true end
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local info = {}
    for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
    local told = info['inactive'] ~= nil or ARGV[4] == '1'
    if told and info['name'] ~= ARGV[3] and not live[info['name']] and info['pending'] == 0
            and info['idle'] >= tonumber(ARGV[2]) then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
        table.insert(removed, info['name'])
    end
end
return removed
"""


class Housekeeper:
    """The housekeeping of one consumer-group source (``source``): with
    ``trim``, its streams are trimmed (XTRIM MINID) up to the oldest entry
    that some group still needs; with ``remove_after`` (seconds), the group's
    other consumers idle for longer that hold no pending entry are removed."""

    def __init__(self, source, trim, remove_after):
        self.source = source
        self.trim = trim
        self.remove_after = remove_after
        self.trimmed = 0
        self.removed_consumers = 0

    def probes(self, names):
        """What removing consumers needs, checked by ``start()``."""
        if self.remove_after is None:
            return []
        group, consumer = self.source.group, self.source.consumer
        return [["EVAL", "return 0", 0],
                *[["XINFO", "CONSUMERS", name, group] for name in names],
                *[["XGROUP", "DELCONSUMER", name, group, consumer] for name in names]]

    def figures(self):
        figures = {"trimmed": self.trimmed}
        if self.remove_after is not None:
            figures["removed_consumers"] = self.removed_consumers
        return figures

    async def tidy(self, client):
        """On the figures' beat: trim each stream up to what is needed."""
        if not self.trim:
            return
        source = self.source
        for name in source.start_ids:
            try:
                trimmed = await _trim_to_oldest_needed(client, name)
            except Exception as exc:
                if not source.stopped:
                    log.warning("%s: trimming stream %r failed (%s)", source, name, _error_text(exc))
                continue
            if trimmed and trimmed[1]:
                self.trimmed += trimmed[1]
                log.debug("%s: trimmed %d entries of stream %r, up to %s (needed by group %r)",
                          source, trimmed[1], name, trimmed[0], trimmed[2])

    async def after_sweep(self, client):
        """After a claim sweep: remove the consumers idle for longer than
        ``remove_after`` that hold no pending entry (a dead one's were
        claimed by the sweep once idle for ``claim_idle``)."""
        if self.remove_after is None:
            return
        source = self.source
        live = await source.live_consumers()
        for name in source.start_ids:
            try:
                removed = await client.eval(
                    REMOVE_IDLE_CONSUMERS, 1, name, source.group, int(self.remove_after * 1000),
                    source.consumer, "0" if live is None else "1", *sorted(live or ()),
                )
            except redis.exceptions.ResponseError as exc:
                log.warning("%s: removing idle consumers of stream %r failed (%s)",
                            source, name, _error_text(exc))
                continue
            if removed:
                self.removed_consumers += len(removed)
                log.info("%s: removed %d idle consumer(s) with nothing pending from stream %r: %s",
                         source, len(removed), name, ", ".join(map(_text, removed)))


# --------------------------------------------------------------------------
# The command line: python -m streamz_redis --help
# --------------------------------------------------------------------------


class _CommandError(Exception):
    """Bad input, said in one line on stderr."""


def _shown(value):
    """A name or value from Redis, fit to print: UTF-8 where it is, escapes
    where not, and every control character escaped (a name holding an escape
    sequence or a newline must not rewrite what the operator reads)."""
    text = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _flat_fields(flat):
    """An entry's ``[field, value, ...]`` as printable ``{field: value}``."""
    return {_shown(flat[i]): _shown(flat[i + 1]) for i in range(0, len(flat), 2)}


DEAD_LETTER_FIELDS = (b"source_stream", b"source_id", b"deliveries")

# Redrive one dead-letter entry: add its fields back to its source stream,
# then delete it from the dead-letter stream, in one script. An entry that is
# no longer there (redriven meanwhile) is not added again.
REDRIVE_ENTRY = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return false end
local added = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], ARGV[1])
return added
"""


def _original_fields(flat):
    """``(source stream, its original flat fields)`` of a dead-letter entry.
    The dead-letter move appends source_stream, source_id and deliveries
    last; an entry written otherwise loses those fields wherever they are."""
    names = flat[0::2]
    if tuple(names[-3:]) == DEAD_LETTER_FIELDS:
        original, extra = flat[:-6], flat[-6:]
    else:
        original = [v for i in range(0, len(flat), 2) if flat[i] not in DEAD_LETTER_FIELDS
                    for v in flat[i:i + 2]]
        extra = flat
    fields = dict(zip(extra[0::2], extra[1::2]))
    return fields.get(b"source_stream"), original


async def _existing_stream(client, stream):
    kind = _text(await client.type(stream))
    if kind == "none":
        raise _CommandError(f"no such stream: {stream!r}")
    if kind != "stream":
        raise _CommandError(f"key {stream!r} holds a {kind}, not a stream")


async def _cli_info(client, args):
    await _existing_stream(client, args.stream)
    stream_info = await client.xinfo_stream(args.stream)
    first, last = stream_info.get("first-entry"), stream_info.get("last-entry")
    groups = []
    for group in await client.xinfo_groups(args.stream):
        name = _text(group["name"])
        consumers = await client.xinfo_consumers(args.stream, name)
        groups.append({
            "name": name,
            "lag": await _group_lag(client, args.stream, group, stream_info["last-generated-id"]),
            "pending": group["pending"],
            "last_delivered_id": _text(group["last-delivered-id"]),
            "consumers": [
                {"name": _shown(c["name"]), "pending": c["pending"], "idle_ms": c["idle"]}
                for c in consumers
            ],
        })
    figures = {
        "stream": args.stream,
        "length": stream_info["length"],
        "first_id": _text(first[0]) if first else None,
        "last_id": _text(last[0]) if last else None,
        "groups": groups,
    }
    if args.json:
        print(json.dumps(figures))
        return
    print(f"stream {args.stream}: {figures['length']} entries, "
          f"first {figures['first_id']}, last {figures['last_id']}")
    for group in groups:
        lag = "unknown" if group["lag"] is None else group["lag"]
        print(f"  group {group['name']}: lag {lag}, pending {group['pending']}, "
              f"last delivered {group['last_delivered_id']}")
        for consumer in group["consumers"]:
            print(f"    consumer {consumer['name']}: pending {consumer['pending']}, "
                  f"idle {consumer['idle_ms']} ms")


async def _cli_pending(client, args):
    await _existing_stream(client, args.stream)
    rows = await client.xpending_range(args.stream, args.group, "-", "+", args.count)
    summary = await client.xpending(args.stream, args.group)
    if args.json:
        print(json.dumps({"stream": args.stream, "group": args.group, "pending": summary["pending"],
                          "oldest": [{"id": _text(row["message_id"]), "consumer": _shown(row["consumer"]),
                                      "idle_ms": row["time_since_delivered"],
                                      "deliveries": row["times_delivered"]} for row in rows]}))
        return
    for row in rows:
        print(f"{_text(row['message_id'])}  consumer {_shown(row['consumer'])}  "
              f"idle {row['time_since_delivered']} ms  deliveries {row['times_delivered']}")
    print(f"{summary['pending']} pending in group {args.group} of stream {args.stream}"
          + (f", the oldest {len(rows)} shown" if summary["pending"] > len(rows) else ""))


async def _cli_dead_letters(client, args):
    dead_letters = args.stream + ":dead-letter"
    if _text(await client.type(dead_letters)) == "none":
        await _existing_stream(client, args.stream)  # a typo is an error, not "none"
        print(json.dumps({"stream": dead_letters, "length": 0, "entries": []}) if args.json
              else f"{dead_letters} holds no entries")
        return
    await _existing_stream(client, dead_letters)
    entries = []
    for entry_id, flat in await client.xrange(dead_letters, count=args.count):
        fields = _flat_fields(flat)
        entries.append({"id": _text(entry_id), "source_stream": fields.pop("source_stream", None),
                        "source_id": fields.pop("source_id", None),
                        "deliveries": fields.pop("deliveries", None), "fields": fields})
    length = await client.xlen(dead_letters)
    if args.json:
        print(json.dumps({"stream": dead_letters, "length": length, "entries": entries}, ensure_ascii=False))
        return
    for entry in entries:
        print(f"{entry['id']}  source {entry['source_stream'] or '?'} {entry['source_id'] or '?'}  "
              f"deliveries {entry['deliveries'] or '?'}  {json.dumps(entry['fields'], ensure_ascii=False)}")
    print(f"{length} entries in {dead_letters}")


class _Redrive:
    """``redrive``: dead letters back onto their streams, one script an
    entry, stopping between two entries on Ctrl-C or SIGTERM."""

    def __init__(self, client, args):
        self.client, self.args = client, args
        self.targets = _redrive_targets(args)
        self.script = client.register_script(REDRIVE_ENTRY)
        self.done = self.left = 0
        self.refused = False
        self.interrupted = False
        self.progress = _Progress("redrive", quiet=args.quiet)

    def more(self):
        return (self.args.count is None or self.done < self.args.count) and not self.interrupted

    async def run(self):
        args = self.args
        await _existing_stream(self.client, args.dead_letter_stream)
        after = "-"
        while self.more():
            page = await self.client.xrange(args.dead_letter_stream, after, "+", count=100)
            if not page:
                break
            after = "(" + _text(page[-1][0])
            for entry_id, flat in page:
                self.interrupted = args.stopping.is_set()
                if not self.more():
                    break
                await self.one(entry_id, flat)
        self.progress.end()
        verb = "would redrive" if args.dry_run else "redrove"
        if args.json:
            print(json.dumps({"redrove" if not args.dry_run else "would_redrive": self.done,
                              "left_in_place": self.left, "interrupted": self.interrupted,
                              "from": args.dead_letter_stream}))
        elif not args.quiet:
            print(("interrupted: " if self.interrupted else "") + f"{verb} {self.done} entries from "
                  f"{args.dead_letter_stream}" + (f"; {self.left} left in place" if self.left else ""))
        if self.interrupted:
            return 128 + args.stopped_by
        return 1 if self.refused else 0

    async def one(self, entry_id, flat):
        source, original = _original_fields(flat)
        if source is None or not original:
            print(f"{_text(entry_id)}: no source_stream or no fields; left in place", file=sys.stderr)
            self.left += 1
            return
        if source not in self.targets:
            # Whoever may write the dead-letter stream must not choose where
            # an operator's redrive writes.
            print(f"{_text(entry_id)}: its source_stream {_shown(source)} is not "
                  f"{' or '.join(sorted(map(_shown, self.targets)))}; left in place", file=sys.stderr)
            self.left += 1
            self.refused = True
            return
        if self.args.dry_run:
            if self.args.json:
                print(json.dumps({"id": _text(entry_id), "to": _shown(source),
                                  "fields": _flat_fields(original)}, ensure_ascii=False))
            else:
                print(f"{_text(entry_id)} would go back to {_shown(source)}: "
                      f"{json.dumps(_flat_fields(original), ensure_ascii=False)}")
            self.done += 1
            return
        try:
            added = await self.script(keys=[self.args.dead_letter_stream, source], args=[entry_id, *original])
        except redis.exceptions.ResponseError as exc:
            if "WRONGTYPE" not in str(exc):  # Redis 6.2 puts it after the script's name
                raise  # not this entry's doing (NOPERM, say): one line, and stop
            print(f"{_text(entry_id)}: {_shown(source)} is not a stream; left in place", file=sys.stderr)
            self.left += 1
            self.refused = True
            return
        if added is not None:  # else redriven by someone else meanwhile
            if self.args.json:  # what went where, one object a line; else only the count
                print(json.dumps({"id": _text(entry_id), "to": _shown(source), "new_id": _text(added)}))
            self.done += 1
            self.progress.step(self.done)


class _Progress:
    """A long command's progress on stderr, where stderr is a terminal (its
    count and rate, from the first step on, rewritten in place at most 5
    times a second); nothing
    elsewhere, where the summary on stdout says it all."""

    def __init__(self, what, quiet=False):
        self.what = what
        self.shown = not quiet and sys.stderr.isatty()
        self.began = self.last = time.monotonic()
        self.count = 0

    def step(self, count):
        self.count = count
        now = time.monotonic()
        if self.shown and (now - self.last >= 0.2 or count == 1):
            self.last = now
            rate = count / max(now - self.began, 1e-9)
            print(f"\r{self.what}: {count:,} entries, {rate:,.0f}/s", end="", file=sys.stderr, flush=True)

    def end(self):
        if self.shown and self.last != self.began:
            print(file=sys.stderr, flush=True)  # the progress line stays, the summary goes below


def _redrive_targets(args):
    """The streams a redrive may write to, as bytes: those given with --to,
    else the one the dead-letter stream's name implies (``S:dead-letter``
    belongs to ``S``)."""
    dead_letters = args.dead_letter_stream
    if args.to:
        targets = set(args.to)
    elif dead_letters.endswith(":dead-letter") and len(dead_letters) > len(":dead-letter"):
        targets = {dead_letters[:-len(":dead-letter")]}
    else:
        raise _CommandError(
            f"{_shown(dead_letters)} is not named <stream>:dead-letter: say which streams its "
            "entries may go back to with --to STREAM (once for each)")
    if dead_letters in targets:
        raise _CommandError("--to: a dead-letter stream is never redriven into itself")
    return {target.encode() for target in targets}


async def _cli_redrive(client, args):
    return await _Redrive(client, args).run()


async def _cli_tail(client, args):
    await _existing_stream(client, args.stream)
    stopping = args.stopping
    last = await client.xrevrange(args.stream, count=1)
    after = _text(last[0][0]) if last else "0-0"
    if not args.quiet:
        print(f"tailing {args.stream} after {after} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    while not stopping.is_set():
        reply = await client.xread({args.stream: after}, count=100, block=int(TAIL_BLOCK * 1000))
        for _, entries in _stream_entries(reply):
            for entry_id, flat in entries:
                if args.json:
                    print(json.dumps({"id": _text(entry_id), "fields": _flat_fields(flat)},
                                     ensure_ascii=False), flush=True)
                else:
                    print(entry_id, json.dumps(_flat_fields(flat), ensure_ascii=False), flush=True)
                after = entry_id


async def _cli_trim(client, args):
    await _existing_stream(client, args.stream)
    trimmed = await _trim_to_oldest_needed(client, args.stream)
    if args.json:
        keep, count, group = trimmed if trimmed is not None else (None, 0, None)
        print(json.dumps({"stream": args.stream, "trimmed": count, "kept_from": _text(keep) if keep else None,
                          "needed_by": _text(group) if group else None}))
        return
    if trimmed is None:
        print(f"{args.stream} has no consumer group: nothing says what may go; not trimmed")
        return
    keep, count, group = trimmed
    print(f"trimmed {count} entries from {args.stream}: kept from {keep}, "
          f"which group {group} still needs")


def _count_argument(text):
    try:
        number = int(text)
    except ValueError:
        number = 0
    if not 1 <= number <= COUNT_MAX:
        raise argparse.ArgumentTypeError(f"expected a positive whole number up to {COUNT_MAX}, not {text!r}")
    return number


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _prog():
    """How the command was called: ``streamz-redis`` (the console script), or
    ``python -m streamz_redis``."""
    return "streamz-redis" if os.path.basename(sys.argv[0]) == "streamz-redis" else "python -m streamz_redis"


def _global_options(parser, defaults):
    """--url, --cluster, --json and --quiet, before the command or after it (``defaults``:
    the top level's; a command's leave the top level's value alone)."""
    parser.add_argument("--url", default=None if defaults else argparse.SUPPRESS,
                        help="Redis URL (default: REDIS_URL, else "
                        f"{DEFAULT_URL}); the password is never printed")
    parser.add_argument("--cluster", action="store_true", default=False if defaults else argparse.SUPPRESS,
                        help="--url names a node (any) of a Redis Cluster: each command goes "
                        "to the node that owns its key's slot")
    parser.add_argument("--json", action="store_true", default=False if defaults else argparse.SUPPRESS,
                        help="print JSON: one object (a line each for tail, and for redrive's entries)")
    parser.add_argument("--quiet", "-q", action="store_true", default=False if defaults else argparse.SUPPRESS,
                        help="no progress and no summary on long commands; errors only")


def _parser():
    parser = _ArgumentParser(
        prog=_prog(),
        description="Look into Redis Streams and consumer groups, redrive dead letters, trim.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    def command(name, help):
        return commands.add_parser(name, help=help, parents=[common])

    info = command("info", help="length, first and last id, groups and consumers")
    info.add_argument("stream")
    info.set_defaults(run=_cli_info)
    pending = command("pending", help="the oldest pending entries of a group")
    pending.add_argument("stream")
    pending.add_argument("group")
    pending.add_argument("--count", type=_count_argument, default=10)
    pending.set_defaults(run=_cli_pending)
    dead = command("dead-letters", help="what STREAM:dead-letter holds")
    dead.add_argument("stream")
    dead.add_argument("--count", type=_count_argument, default=100)
    dead.set_defaults(run=_cli_dead_letters)
    redrive = command("redrive", help="put dead letters back on their streams")
    redrive.add_argument("dead_letter_stream")
    redrive.add_argument("--count", type=_count_argument, default=None, help="at most this many")
    redrive.add_argument("--dry-run", action="store_true", help="say what would go back")
    redrive.add_argument("--to", action="append", metavar="STREAM",
                         help="a stream entries may go back to (default: S for S:dead-letter); "
                         "entries naming another are left in place")
    redrive.set_defaults(run=_cli_redrive, stops_between_steps=True)
    tail = command("tail", help="print entries as they arrive, until Ctrl-C")
    tail.add_argument("stream")
    tail.set_defaults(run=_cli_tail, stops_between_steps=True)
    trim = command("trim", help="trim up to the oldest entry a group still needs")
    trim.add_argument("stream")
    trim.set_defaults(run=_cli_trim)
    return parser


def _cli_client(args):
    """The client of a command, and how its errors name the server."""
    url = args.url or os.environ.get("REDIS_URL") or DEFAULT_URL
    try:
        _check_url(url)
    except ValueError as exc:
        raise _CommandError(str(exc)) from None
    make = redis.asyncio.RedisCluster.from_url if args.cluster else redis.asyncio.from_url
    where = ("Redis Cluster " if args.cluster else "Redis ") + f"at {_safe_url(url)}"
    try:
        client = make(url, socket_connect_timeout=5, socket_timeout=10, retry=Retry(NoBackoff(), 0))
    except redis.exceptions.RedisError as exc:  # a RedisCluster refuses a db number
        raise _CommandError(f"{where}: {_error_text(exc)}") from None
    for command in ("XRANGE", "XREAD"):
        client.set_response_callback(command, _raw_reply)  # flat fields, as Redis keeps them
    return client, where


def _stop_between_steps(args):
    """Ctrl-C (or SIGTERM) ends tail and redrive between two steps, never
    inside one (a cancel can be lost inside redis-py's reads on Python 3.11).
    A second one interrupts at once, as usual."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def stop(signal_number):
        args.stopped_by = signal_number
        args.stopping.set()
        for number in signals:
            loop.remove_signal_handler(number)

    for signal_number in signals:
        try:
            loop.add_signal_handler(signal_number, stop, signal_number)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
            pass


def _refused_login(exc, where):
    """A refused login in plain words: redis-py 8 says what HELLO answered."""
    words = str(exc)
    if "NOAUTH" in words or "HELLO must be called" in words or "required" in words.lower():
        return (f"{where} needs a password: give it in the URL (redis://:PASSWORD@host:port, "
                "or redis://USER:PASSWORD@... for an ACL user), with --url or REDIS_URL")
    return f"{where} refused the login ({_error_text(exc)})"


def _said_by_redis(exc, args, where):
    """A Redis error as one line: what the server said, and a hint."""
    moved = isinstance(exc, redis.exceptions.AskError) or str(exc).startswith(("MOVED ", "ASK "))  # redis-py 5
    hint = "; it is a node of a Redis Cluster: add --cluster" if moved and not args.cluster else ""
    return _CommandError(f"{where} says: {_error_text(exc)}{hint}")


async def _cli(args):
    client, where = _cli_client(args)
    args.stopping = asyncio.Event()
    if getattr(args, "stops_between_steps", False):
        _stop_between_steps(args)
    try:
        return await args.run(client, args)
    except BrokenPipeError:
        raise  # `... | head`: the reader went away; main() ends quietly
    except redis.exceptions.AuthenticationError as exc:
        raise _CommandError(_refused_login(exc, where)) from None
    except CONNECTION_ERRORS as exc:
        raise _CommandError(f"cannot reach {where} ({_error_text(exc)})") from None
    except redis.exceptions.RedisError as exc:
        raise _said_by_redis(exc, args, where) from None
    except (_CommandError, asyncio.CancelledError):
        raise
    except Exception as exc:  # a surprise is still one line, not a traceback
        raise _CommandError(f"{args.command} failed: {_error_text(exc)}") from None
    finally:
        try:
            await client.aclose()
        except Exception:  # pragma: no cover - closing a dead socket
            pass


def main(argv=None):
    """``python -m streamz_redis``: run one command; the exit code (0; 1 for
    an error said on stderr in one line, or a redrive that left entries it
    could not put back; 2 for a bad command line; 130 when Ctrl-C
    interrupted it; 143 for SIGTERM; tail ends with 0 on either)."""
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_cli(args)) or 0
    except _CommandError as exc:
        print(f"{_prog()}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C where no handler was installed
        print(f"{_prog()}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `... | head`: the reader went away
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
