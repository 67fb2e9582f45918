"""Exactly-once writes for streamz-redis: ``exactly_once=True`` on the
sinks that write keys (streams, lists, hashes, keys, sorted sets, sets and
commands with a key).

``streamz_redis`` imports this module when a sink is made with
``exactly_once=True``, and never otherwise. ``ExactlyOnce`` is the sink's
write plan, in place of ``streamz_redis._PlainWrites``: it writes each element
and acknowledges the consumer-group entries (or reliable-list items) it came
from in one script, so that after a crash the output holds each input once.

- ``check``: at the first element from a source, the pipeline must end in
  this sink alone, by one path (one walk of the streamz graph).
- ``prepare``: once per round trip, which entries each write acknowledges:
  those nothing but this write still holds (the source's ledger says).
- ``refused``: a source on another server, or keys in several slots of a
  Redis Cluster, are refused with a clear error (no script spans them).
- ``commands``: consecutive writes to one key from one stream and group go in
  one script (``WRITE_AND_ACKNOWLEDGE``), as if each ran its own.
"""

import hashlib

import redis.exceptions
import streamz.core

from streamz_redis import _below, _leaves, _references, log

__all__ = ["ExactlyOnce"]

# At most this many elements in one script, and about this many entries
# acknowledged by it: a script runs alone on the server.
SCRIPT_ELEMENTS = 500
SCRIPT_ENTRIES = 1000
SCRIPT_ARGUMENTS = 4000  # of one element's command: more, and it goes in a script of its own
# Lua's unpack() gives at most about 8,000 values ("too many results to
# unpack", on 6.2, 7.0 and Valkey alike; 3,000 fields went, 5,000 did not): an
# element whose command has more arguments cannot be written by a script.
UNPACK_LIMIT = 7900

# Elements and the acknowledgement of the upstream entries each carries, in one
# script: as if each element ran a script of its own, together. KEYS[1] is
# where the elements go, KEYS[2..] the stream (or processing list) of each
# entry, in order. ARGV: the number of elements, then for each element how
# many steps (commands on KEYS[1]) it takes, each step as how many arguments
# follow, its command name and the arguments after the key, and how many
# entries it carries; then each entry's acknowledgement (XACK group id, or
# LREM 1 item). The reply has one status an element: 1 written and its
# entries acknowledged, 0 left out (none of its entries pending), or a
# message starting with "!": nothing of it acknowledged.
# - An element is written only if every one of its entries is still pending:
#   a script sent again after a lost reply (by us, or by the retries of a
#   user's own client) writes nothing twice, and an element some of whose
#   entries another consumer took over is left, its other entries pending.
# - Redis 7 checks the user's permissions for every step first; a counter
#   that holds no number Redis adds to (HINCRBY and INCRBY would fail
#   half-way, after the steps before them), or an integer added to a field
#   that a float of this script made a fraction, refuses its element before
#   anything is written. Each step runs with redis.pcall: an element whose
#   first step Redis refuses is not written, and the elements beside it are.
WRITE_AND_ACKNOWLEDGE = """
local elements, at = {}, 2
for i = 1, tonumber(ARGV[1]) do
    local steps = {}
    for j = 1, tonumber(ARGV[at]) do
        local n = tonumber(ARGV[at + 1])
        steps[j] = {at + 2, at + n + 1}  -- the command's name, then its arguments after the key
        at = at + n + 1
    end
    elements[i] = {steps, tonumber(ARGV[at + 1])}
    at = at + 2
end
local key, run, taken, status = 2, {}, {}, {}  -- taken: entries acknowledged by an earlier element
for e, element in ipairs(elements) do
    local pending = 0
    for j = 0, element[2] - 1 do
        local a, entry = at + 3 * j, KEYS[key + j] .. '\\0' .. ARGV[at + 3 * j + 2]
        if ARGV[a] == 'XACK' then
            if not taken[entry]
                and #redis.call('XPENDING', KEYS[key + j], ARGV[a + 1], ARGV[a + 2], ARGV[a + 2], 1) > 0 then
                pending = pending + 1
            end
        elseif redis.call('LPOS', KEYS[key + j], ARGV[a + 2], 'RANK', (taken[entry] or 0) + 1) then
            pending = pending + 1
        end
    end
    if pending == element[2] then
        table.insert(run, {element[1], key, at, element[2], e})
        for j = 0, element[2] - 1 do
            local entry = KEYS[key + j] .. '\\0' .. ARGV[at + 3 * j + 2]
            taken[entry] = (taken[entry] or 0) + 1
        end
    elseif pending == 0 then
        status[e] = 0
    else
        status[e] = '!' .. (element[2] - pending) .. ' of its ' .. element[2] ..
            ' entries were taken over by another consumer; the others stay pending'
    end
    key, at = key + element[2], at + 3 * element[2]
end
if redis.acl_check_cmd then
    for _, element in ipairs(run) do
        local allowed = true
        for _, step in ipairs(element[1]) do
            allowed = allowed and redis.acl_check_cmd(ARGV[step[1]], KEYS[1], unpack(ARGV, step[1] + 1, step[2]))
        end
        for j = 0, element[4] - 1 do
            local ack = element[3] + 3 * j
            allowed = allowed and redis.acl_check_cmd(ARGV[ack], KEYS[element[2] + j], ARGV[ack + 1], ARGV[ack + 2])
        end
        if not allowed then
            return redis.error_reply('NOPERM this user may not run ' .. ARGV[element[1][1][1]] .. ' on ' ..
                KEYS[1] .. ' and acknowledge its entries')
        end
    end
end
-- Redis's integers: no leading zeros, at most 19 digits, within 64 bits.
local function integer(value)
    return value == '0' or (string.match(value, '^-?[1-9]%d*$') ~= nil and #value <= 20
        and math.abs(tonumber(value)) < 9.2e18)
end
local counted, floated, sums, accepted = {}, {}, {}, {}  -- per field: a number, a fraction, the sum
local pushes = true
for _, element in ipairs(run) do
    local refused
    for _, step in ipairs(element[1]) do
        local name = ARGV[step[1]]
        local hash = name == 'HINCRBY' or name == 'HINCRBYFLOAT'
        if not refused and (hash or name == 'INCRBY' or name == 'INCRBYFLOAT') then
            local field = hash and ARGV[step[1] + 1] or ''
            local whole = name == 'HINCRBY' or name == 'INCRBY'
            if counted[field] == nil then
                local value = hash and redis.call('HGET', KEYS[1], field) or (not hash and redis.call('GET', KEYS[1]))
                counted[field] = not value or tonumber(value) ~= nil and (not whole or integer(value))
                floated[field] = value and not integer(value)
                sums[field] = value and tonumber(value) or 0
            end
            local what = KEYS[1] .. (hash and (' field ' .. field) or '')
            local by = tonumber(ARGV[step[2]])
            if by == nil or (whole and not integer(ARGV[step[2]])) then
                refused = '!' .. name .. ' ' .. what .. ': ' .. ARGV[step[2]] .. ' is no ' ..
                    (whole and 'integer' or 'number') .. ' to add'
            elseif not counted[field] then
                refused = '!' .. what .. ' holds no ' .. (whole and 'integer' or 'number') .. ' to add to'
            elseif whole and floated[field] then
                refused = '!' .. what .. ' holds a fraction (or a float before it made one): ' .. name ..
                    ' adds integers only, give it floats'
            elseif whole and math.abs(sums[field] + by) >= 9.2e18 then
                refused = '!' .. what .. ' would go beyond 64-bit integers'
            else
                sums[field] = sums[field] + by
                floated[field] = floated[field] or not whole
            end
        end
    end
    if refused then
        status[element[5]] = refused .. '; nothing of it was written'
    else
        table.insert(accepted, element)
        local first = element[1][1]  -- one push of one value, as the first element's
        pushes = pushes and #element[1] == 1 and first[1] + 1 == first[2]
            and (ARGV[first[1]] == 'RPUSH' or ARGV[first[1]] == 'LPUSH')
            and ARGV[first[1]] == ARGV[accepted[1][1][1][1]]
    end
end
local function acknowledge(element)
    for j = 0, element[4] - 1 do
        local ack = element[3] + 3 * j
        redis.call(ARGV[ack], KEYS[element[2] + j], ARGV[ack + 1], ARGV[ack + 2])
    end
    status[element[5]] = 1
end
if pushes and #accepted > 1 then  -- list pushes of one value each go in as one (the order is the same)
    local pushed = {}
    for i, element in ipairs(accepted) do
        pushed[i] = ARGV[element[1][1][2]]
    end
    redis.call(ARGV[accepted[1][1][1][1]], KEYS[1], unpack(pushed))
    for _, element in ipairs(accepted) do
        acknowledge(element)
    end
else
    for _, element in ipairs(accepted) do
        local failed
        for s, step in ipairs(element[1]) do
            local reply = redis.pcall(ARGV[step[1]], KEYS[1], unpack(ARGV, step[1] + 1, step[2]))
            if type(reply) == 'table' and reply.err then
                failed = '!' .. reply.err .. (s > 1 and ' (its first steps were written: not acknowledged, so ' ..
                    'they may be written again)' or '')
                break
            end
        end
        if failed then
            status[element[5]] = failed
        else
            acknowledge(element)
        end
    end
end
return status
"""
WRITE_AND_ACKNOWLEDGE_SHA = hashlib.sha1(WRITE_AND_ACKNOWLEDGE.encode()).hexdigest()

# A stream entry too large for a script (one XADD of more than UNPACK_LIMIT
# arguments) is written apart, in three steps that each may be repeated:
# RESERVE_OR_ACKNOWLEDGE gives the id it will have; a plain XADD writes it
# with that id; RESERVE_OR_ACKNOWLEDGE again finds it written and acknowledges
# its entries. The reservation (a field of KEYS[2], named after the first
# entry) survives a crash, so that a replay finds the entry written and only
# acknowledges it. A second writer of the same entry (another consumer took it
# over) reuses a reservation that the stream can still take, so that one of
# the two XADDs fails as "equal or smaller" and neither writes it twice.
# An entry found at the reserved id is taken for ours only if its fields have
# the digest of ours: another writer's XADD may have taken the id.
# KEYS[1] the output stream, KEYS[2] the reservations, KEYS[3..] each entry's
# stream (or processing list); ARGV: the digest, then each entry's
# acknowledgement, as in WRITE_AND_ACKNOWLEDGE. Replies: 'done' (nothing pending: written and
# acknowledged before, or by another consumer), 'written' (acknowledged now),
# or the id to XADD with.
RESERVE_OR_ACKNOWLEDGE = """
local field = KEYS[3] .. '\\0' .. ARGV[3] .. '\\0' .. ARGV[4]
local pending
if ARGV[2] == 'XACK' then
    pending = #redis.call('XPENDING', KEYS[3], ARGV[3], ARGV[4], ARGV[4], 1) > 0
else
    pending = redis.call('LPOS', KEYS[3], ARGV[4]) ~= false
end
local reserved = redis.call('HGET', KEYS[2], field)
if not pending then
    redis.call('HDEL', KEYS[2], field)
    return 'done'
end
local taken = false  -- the reserved id holds an entry: ours (its digest), or another writer's
if reserved then
    local found = redis.call('XRANGE', KEYS[1], reserved, reserved)
    if #found > 0 then
        local parts = {}
        for i, value in ipairs(found[1][2]) do
            parts[i] = #value .. ':' .. value
        end
        if redis.sha1hex(table.concat(parts)) == ARGV[1] then
            for j = 0, #KEYS - 3 do
                redis.call(ARGV[2 + 3 * j], KEYS[3 + j], ARGV[3 + 3 * j], ARGV[4 + 3 * j])
            end
            redis.call('HDEL', KEYS[2], field)
            return 'written'
        end
        taken = true
    end
end
local last_ms, last_seq = 0, 0
if redis.call('EXISTS', KEYS[1]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[1])
    for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then
            local ms, seq = string.match(info[i + 1], '^(%d+)-(%d+)$')
            last_ms, last_seq = tonumber(ms), tonumber(seq)
        end
    end
end
if reserved and not taken then  -- not written yet: reused while the stream can still take it
    local ms, seq = string.match(reserved, '^(%d+)-(%d+)$')
    ms, seq = tonumber(ms), tonumber(seq)
    if ms > last_ms or (ms == last_ms and seq > last_seq) then
        return reserved
    end
end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local id = ms > last_ms and string.format('%d-0', ms) or string.format('%d-%d', last_ms, last_seq + 1)
redis.call('HSET', KEYS[2], field, id)
return id
"""
APART_TRIES = 50  # reservations overtaken by other writers before giving up


def _status_text(status):
    """The message of an element's status that says why it was not written."""
    text = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
    return text[1:] if text.startswith("!") else text


def fields_digest(values):
    """What RESERVE_OR_ACKNOWLEDGE computes of an entry's fields and values,
    as Redis stores what hiredis (or redis-py) sends."""
    parts = []
    for value in values:
        if isinstance(value, str):
            value = value.encode("utf-8")
        elif isinstance(value, float):
            value = repr(value).encode()
        elif isinstance(value, int):
            value = str(value).encode()
        parts.append(b"%d:%s" % (len(value), value))
    return hashlib.sha1(b"".join(parts)).hexdigest()


def reservations_key(stream):
    """Where the ids reserved for entries written apart into ``stream`` are
    kept: beside it, in its slot of a Redis Cluster."""
    text = stream.decode("utf-8", "surrogateescape") if isinstance(stream, bytes) else stream
    start = text.find("{")
    tagged = start != -1 and text.find("}", start + 2) != -1
    return f"{text}:exactly-once" if tagged else f"{{{text}}}:exactly-once"


# What ExactlyOnce._refusal says of a stream entry too large for a script, which
# is written on its own instead (ExactlyOnce._write_apart).
_APART = object()


class ExactlyOnce:
    """The write plan of an exactly-once sink (see the module's docstring)."""

    def __init__(self, sink):
        self.sink = sink
        self.sources_checked = {}  # source -> None, or why it cannot hold (another server)
        self.warned_held = False
        self.graph_checked = False
        self.scripts = set()  # the scripts of a round trip (their replies are statuses)
        self.steps = {}  # the steps of its writes, by id: made once, by refused()

    # ---- when an element arrives ------------------------------------------

    def check(self, write):
        """Raise, at the first element from a source, if the script cannot
        cover its entries: where they also reach another node that ends the
        pipeline (another sink), or reach this one by more than one path; and
        at the first element at all, if a ``flatten`` is upstream."""
        if not self.graph_checked:
            flattening = [node for node in _below(self.sink, direction="upstreams")
                          if isinstance(node, streamz.core.flatten)]
            if flattening:
                raise ValueError(
                    f"{self.sink}: exactly_once cannot follow {flattening[0]}: streamz's flatten passes "
                    "an element's entries with its last item only, so the items before it would be "
                    "written without them. Write the list as one element (the sinks take several "
                    "fields, members or pairs at once), or drop exactly_once")
            self.graph_checked = True
        for source in {ack.ledger.source for ref in _references(write.metadata) for ack in ref.entries()}:
            if source in self.sources_checked:
                continue
            leaves = _leaves(source)
            if leaves != {self.sink: 1}:
                others = [f"{node}" + (f" ({n} paths)" if n > 1 else "") for node, n in leaves.items()]
                raise ValueError(
                    f"{self.sink}: exactly_once needs every entry of {source} to end in this sink, "
                    f"by one path; they end in {', '.join(others)}. Drop exactly_once "
                    "(at-least-once), or give each branch its own source"
                )
            self.sources_checked[source] = None

    # ---- once per round trip ----------------------------------------------

    def prepare(self, writes):
        for write in writes:
            write.acks = self._acks_to_settle(write)

    def _acks_to_settle(self, write):
        """The entries the script may acknowledge with ``write``: those that
        nothing but this write still holds. An entry another node still holds
        (a ``sliding_window`` emits it again in its next window) is left to
        its source, acknowledged when that node lets go: at-least-once."""
        acks = []
        for ref in _references(write.metadata):
            if ref.ledger.held_only_by_one(ref):
                acks.extend(ref.entries())
            elif not self.warned_held:
                self.warned_held = True
                log.warning(
                    "%s: exactly_once: %s is still held by another node (a node that emits an "
                    "entry more than once, such as sliding_window?); such entries are "
                    "acknowledged by their source once let go: at-least-once", self.sink, ref,
                )
        return acks

    async def refused(self, client, writes):
        """Refuse the writes that no one script can cover: keys in several
        slots of a Redis Cluster, or sources that read another Redis server
        (or database) than this sink writes to. A stream entry too large for
        a script is written here, apart (``True`` in its place)."""
        await self._check_servers(client, writes)
        refused = []
        self.steps = {}
        for write in writes:
            if refused and refused[-1] is False:
                refused.append(False)  # after an element written apart: in a later try, in order
                continue
            steps = self.steps[id(write)] = self.sink.write_steps(write)
            why = self._refusal(write, steps)
            if why is not _APART:
                refused.append(why)
            elif refused:  # the writes before it first, through the pipeline
                refused.append(False)
            else:  # first: alone, and what follows it in a later try
                refused.append(await self._write_apart(client, write, steps[0]))
                return refused + [False] * (len(writes) - 1)
        return refused

    def _refusal(self, write, steps):
        """Why no script can write ``write`` (an error to fail it with), or
        _APART (a stream entry too large for a script, written on its own),
        or None."""
        size = max(len(step) - 2 for step in steps)
        if write.key is None:
            return ValueError(
                f"{self.sink}: exactly_once: a command without a key (its first argument) "
                "cannot be written with its entries' acknowledgements")
        large = size > UNPACK_LIMIT and write.acks
        apart = None
        if self.sink.topology.shards_keys:
            keys = [write.key, *{ack.key for ack in write.acks}]
            apart = self.sink.topology.slots_apart([*keys, reservations_key(write.key)] if large else keys)
        if apart:
            return ValueError(
                f"{self.sink}: exactly_once: CROSSSLOT, the output and its entries' keys are in "
                f"different slots ({apart}); give them one hash tag, such as '{{orders}}' and "
                "'{orders}:out'")
        checked = self.sources_checked
        reasons = [checked[ack.ledger.source] for ack in write.acks if checked.get(ack.ledger.source)]
        if reasons:
            return ValueError(f"{self.sink}: {reasons[0]}")
        if large and steps[0][0] == "XADD" and len(steps) == 1:
            return _APART
        if large:
            return ValueError(
                f"{self.sink}: exactly_once: an element of {size} arguments to {steps[0][0]} "
                f"cannot be written by a script (Lua passes at most about {UNPACK_LIMIT}); "
                "its entries are not acknowledged: split it (max_deliveries sends it to the "
                "dead-letter stream)")
        return None

    async def _write_apart(self, client, write, command):
        """Write one stream entry too large for a script, and acknowledge its
        entries, exactly once (see RESERVE_OR_ACKNOWLEDGE): True, or the
        error Redis answered. A lost connection raises, and the round trip
        tries again from the start, which finds what was done."""
        acks = [ack.command() for ack in write.acks]
        keys = [write.key, reservations_key(write.key), *[ack[1] for ack in acks]]
        at = command.index("*")  # after XADD, the key and MAXLEN: the id
        args = [fields_digest(command[at + 1:]),
                *[part for command_name, _, first, second in acks for part in (command_name, first, second)]]
        for _ in range(APART_TRIES):
            answer = await client.execute_command("EVAL", RESERVE_OR_ACKNOWLEDGE, len(keys), *keys, *args)
            if isinstance(answer, bytes):
                answer = answer.decode()
            if answer in ("done", "written"):
                return True
            try:
                await client.execute_command(*command[:at], answer, *command[at + 1:])
            except redis.exceptions.ResponseError as exc:
                if "equal or smaller" not in str(exc):
                    return exc
                # Another writer added a later entry first: reserve again.
        return RuntimeError(f"{self.sink}: exactly_once: the stream {write.key!r} moved past "
                            f"{APART_TRIES} reserved ids in turn; the entries stay pending")

    async def _check_servers(self, client, writes):
        """Once per source that is connected: which server it reads."""
        unchecked = {ack.ledger.source for write in writes for ack in write.acks
                     if self.sources_checked.get(ack.ledger.source) is None}
        for source in unchecked:
            there = await source.server_identity()
            if there is None:
                continue  # not connected (or a cluster: checked by slot)
            here = await self.sink.topology.server_identity(client)
            self.sources_checked[source] = "" if here == there else (
                f"exactly_once needs {source} and this sink on one Redis server and database"
            )

    def commands(self, writes):
        """Consecutive writes to one key whose entries come from one stream
        and group (or one processing list) go in one script, which commits
        them and their acknowledgements together. Their failures share one
        cause (the key, the group), so no write fails for a neighbour's sake.
        A round trip leads with what the topology sends before its scripts."""
        self.scripts = set()  # the scripts of this round trip (their replies are statuses)
        commands = self.sink.topology.script_preamble(WRITE_AND_ACKNOWLEDGE)
        group, entries, source = [], 0, None  # (write, command) of the script being built
        for write in writes:
            steps = self.steps.pop(id(write), None) or self.sink.write_steps(write)
            write_source = {ack.command()[:3] for ack in write.acks}
            if group and (write.key != group[0][0].key or write_source != source
                          or len(group) == SCRIPT_ELEMENTS
                          or entries + len(write.acks) > SCRIPT_ENTRIES):
                commands.append((self._script(group), len(group)))
                group, entries = [], 0
            if not write.acks:  # nothing to acknowledge with it (another node holds its entries)
                commands.append((steps[0], 1))
                commands.extend((step, 0) for step in steps[1:])
            elif len(write_source) > 1 or sum(map(len, steps)) > SCRIPT_ARGUMENTS:
                # Entries of several streams or groups, or an element so large
                # that Lua may not unpack it: alone, failing on its own.
                commands.append((self._script([(write, steps)]), 1))
            else:
                group.append((write, steps))
                entries += len(write.acks)
                source = write_source
        if group:
            commands.append((self._script(group), len(group)))
        return commands

    splits_replies = True

    def split(self, command, answer, carried):
        """The reply of each write a command carries: a script's, one status
        an element (see WRITE_AND_ACKNOWLEDGE); any other command's, its own."""
        if id(command) not in self.scripts or not isinstance(answer, list):
            return [answer] * carried
        return [True if status in (0, 1) else redis.exceptions.ResponseError(_status_text(status))
                for status in answer]

    def _script(self, group):
        """The script that runs the steps of ``group``, ``(write, steps)``
        pairs writing to one key, and acknowledges their entries."""
        keys, args, acks = [group[0][0].key], [], []
        for write, steps in group:
            args.append(len(steps))
            for step in steps:
                args += [len(step) - 1, step[0], *step[2:]]
            args.append(len(write.acks))
            for ack in write.acks:
                command, key, first, second = ack.command()
                keys.append(key)
                acks += [command, first, second]
        args = [len(group), *args, *acks]
        call = self.sink.topology.script_call(WRITE_AND_ACKNOWLEDGE, WRITE_AND_ACKNOWLEDGE_SHA)
        script = (*call, len(keys), *keys, *args)
        self.scripts.add(id(script))
        return script

