"""Exactly-once writes: to_redis_stream and to_redis_list with
exactly_once=True acknowledge each upstream entry (XACK, or LREM for a
reliable list) in the script that writes its result. Here: what they write
and acknowledge, what they refuse (an entry that also reaches another sink,
a source on another server, a user who may not acknowledge), the script as
the sink's own builder makes it, and a worker killed with SIGKILL three
times. The cluster case is in test_streamz_redis_cluster.py.

The servers are the tests' own (see conftest.py).
"""

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis
from streamz import Stream

import streamz_redis
import streamz_redis_exactly_once
from conftest import (
    add_numbers, call_count, entries_read, pending, requires_redis_7, user_url, wait_for,
)


HERE = Path(__file__).parent


# --------------------------------------------------------------------------
# Each entry acknowledged in the script that writes its result
# --------------------------------------------------------------------------


def test_an_exactly_once_sink_acknowledges_each_entry_in_its_own_write(server, r):
    for n in range(50):
        r.xadd("orders", {"n": n})
    source = Stream.from_redis_consumer_group("orders", "billing", "biller", start_id="0")
    sink = source.map(lambda e: {"order": e.id}).to_redis_stream("invoices", exactly_once=True)
    r.config_resetstat()
    source.start()
    wait_for(lambda: pending(r, "orders", "billing") == 0 and r.xlen("invoices") == 50)
    wait_for(lambda: source.metrics()["acked"] == 50)
    source.stop()
    # One XACK per entry, each inside the script that wrote its result; the
    # source sent none of its own.
    assert call_count(r, "xack") == 50
    assert sink.metrics()["written"] == 50


def test_an_exactly_once_sink_writes_consecutive_results_in_one_script(server, r):
    ids = [r.xadd("orders", {"n": n}).decode() for n in range(300)]
    source = Stream.from_redis_consumer_group("orders", "billing", "biller", start_id="0")
    sink = source.map(lambda e: e.id).to_redis_list("invoices", exactly_once=True)
    r.config_resetstat()
    source.start()
    wait_for(lambda: pending(r, "orders", "billing") == 0 and r.llen("invoices") == 300)
    wait_for(lambda: source.metrics()["acked"] == 300)
    source.stop()
    assert [i.decode() for i in r.lrange("invoices", 0, -1)] == ids  # in order, each once
    # Each entry acknowledged inside a script; results that queued together
    # went in one script, so there were fewer scripts than entries.
    assert call_count(r, "xack") == 300
    assert call_count(r, "evalsha") < 300 and call_count(r, "rpush") == call_count(r, "evalsha")
    assert sink.metrics()["written"] == 300


@pytest.mark.parametrize("handled_elsewhere", [0, 1])
@pytest.mark.parametrize("sink", ["list", "stream"])
def test_an_exactly_once_sink_writes_what_another_consumer_took_over_once(
    server, r, sink, handled_elsewhere
):
    # While this consumer processes its first entry, another one claims an
    # entry this one holds (the first, or the next), writes its result and
    # acknowledges it. Found by review: a merged script checked only its
    # first entry, and wrote such a result twice, or left its neighbours
    # unwritten and pending.
    ids = [r.xadd("orders", {"n": n}).decode() for n in range(3)]
    source = Stream.from_redis_consumer_group("orders", "billing", "biller", start_id="0")

    def write(entry_id):
        if sink == "list":
            r.rpush("invoices", entry_id)
        else:
            r.xadd("invoices", {"id": entry_id})

    def written():
        if sink == "list":
            return sorted(i.decode() for i in r.lrange("invoices", 0, -1))
        return sorted(fields[b"id"].decode() for _, fields in r.xrange("invoices"))

    def work(entry):
        if entry.id == ids[0]:
            other = ids[handled_elsewhere]
            r.xclaim("orders", "billing", "other", 0, [other])
            write(other)
            r.xack("orders", "billing", other)
        return entry.id

    results = source.map(work)
    if sink == "list":
        results.to_redis_list("invoices", exactly_once=True)
    else:
        results.map(lambda entry_id: {"id": entry_id}).to_redis_stream("invoices", exactly_once=True)
    source.start()
    wait_for(lambda: source.metrics()["acked"] == 3 and pending(r, "orders", "billing") == 0)
    wait_for(lambda: len(written()) >= 3)
    source.stop()
    assert written() == sorted(ids)


def test_entries_dropped_by_a_filter_are_acknowledged_as_usual(server, r):
    for n in range(10):
        r.xadd("orders", {"n": n})
    source = Stream.from_redis_consumer_group("orders", "billing", "biller", start_id="0")
    odd = source.filter(lambda e: int(e.fields["n"]) % 2)
    odd.map(lambda e: e.id).to_redis_list("odd", exactly_once=True)
    source.start()
    wait_for(lambda: pending(r, "orders", "billing") == 0 and r.llen("odd") == 5)


def test_exactly_once_covers_batches_windows_and_two_groups_feeding_one_sink(server, r):
    for n in range(30):
        r.xadd("a", {"n": n})
        r.xadd("b", {"n": n})
    first = Stream.from_redis_consumer_group("a", "g", "c", start_id="0", batch=True, count=7)
    second = Stream.from_redis_consumer_group("b", "g", "c", start_id="0")
    windows = second.timed_window(0.05).filter(len)
    merged = first.union(windows).map(lambda entries: ",".join(f"{e.stream}:{e.id}" for e in entries))
    merged.to_redis_list("out", exactly_once=True)
    r.config_resetstat()
    first.start()
    second.start()
    wait_for(lambda: entries_read(r, "a", "g") == 30 and entries_read(r, "b", "g") == 30
             and pending(r, "a", "g") == 0 and pending(r, "b", "g") == 0)
    written = [x for item in r.lrange("out", 0, -1) for x in item.decode().split(",")]
    assert len(written) == len(set(written)) == 60
    assert call_count(r, "xack") == 60  # every one inside a script


def test_a_reliable_list_into_an_exactly_once_sink_removes_its_items_in_the_same_script(server, r):
    r.rpush("jobs", *[f"job-{i}" for i in range(20)])
    source = Stream.from_redis_list("jobs", processing_list="jobs:busy")
    source.map(str.upper).to_redis_list("done", exactly_once=True)
    r.config_resetstat()
    source.start()
    wait_for(lambda: r.llen("done") == 20 and r.llen("jobs:busy") == 0)
    wait_for(lambda: source.metrics()["acked"] == 20)
    assert call_count(r, "lrem") == 20  # each once, inside the script that pushed its result


def test_exactly_once_leaves_entries_a_window_still_holds_to_their_source(server, r, caplog):
    ids = [r.xadd("s", {"n": n}).decode() for n in range(5)]
    source = Stream.from_redis_consumer_group("s", "g", "c", start_id="0")
    windows = source.sliding_window(2, return_partial=False)
    windows.map(lambda es: ",".join(e.id for e in es)).to_redis_list("out", exactly_once=True)
    with caplog.at_level(logging.WARNING, logger="streamz_redis"):
        source.start()
        wait_for(lambda: r.llen("out") == 4)
    assert [w.decode() for w in r.lrange("out", 0, -1)] == [f"{a},{b}" for a, b in zip(ids, ids[1:])]
    assert any("still held by another node" in m for m in caplog.messages)
    # Only the last entry, still in the window, waits for its acknowledgement.
    wait_for(lambda: pending(r, "s", "g") == 1)


# --------------------------------------------------------------------------
# What exactly_once refuses: another sink, another server, no XACK
# --------------------------------------------------------------------------


def test_exactly_once_refuses_an_entry_that_also_reaches_another_sink(server, r, caplog):
    r.xadd("orders", {"n": 1})
    source = Stream.from_redis_consumer_group("orders", "billing", "biller", start_id="0")
    source.map(lambda e: {"order": e.id}).to_redis_stream("invoices", exactly_once=True)
    source.sink_to_list()
    with caplog.at_level(logging.ERROR, logger="streamz_redis"):
        source.start()
        wait_for(lambda: any("exactly_once needs every entry" in m for m in caplog.messages))
    source.stop()
    assert r.xlen("invoices") == 0 and pending(r, "orders", "billing") == 1


def test_exactly_once_refuses_a_flatten_upstream_at_the_first_element(server, r, caplog):
    r.xadd("views", {"n": 1})
    source = Stream.from_redis_consumer_group("views", "counting", "c", start_id="0")
    sink = source.map(lambda e: [("x", 1), ("y", 1)]).flatten().to_redis_key(
        increment=True, exactly_once=True)
    with caplog.at_level(logging.ERROR, logger="streamz_redis"):
        source.start()
        wait_for(lambda: source.metrics()["failed"] == 1)
        # The source counts the failure, then logs it: the line may lag the figure.
        wait_for(lambda: any("exactly_once cannot follow" in m and "flatten" in m for m in caplog.messages))
    assert not r.exists("x") and not r.exists("y") and pending(r, "views", "counting") == 1
    assert sink.metrics()["written"] == 0


def test_exactly_once_refuses_a_source_on_another_server(server, r, private_server, caplog):
    target = private_server()
    r.xadd("orders", {"n": 1})
    source = Stream.from_redis_consumer_group("orders", "billing", "biller", start_id="0", url=server.url)
    sink = source.map(lambda e: {"order": e.id}).to_redis_stream("invoices", url=target.url, exactly_once=True)
    with caplog.at_level(logging.ERROR, logger="streamz_redis"):
        source.start()
        wait_for(lambda: sink.metrics()["failed"] == 1)
    assert any("one Redis server and database" in m for m in caplog.messages)
    assert pending(r, "orders", "billing") == 1


@requires_redis_7
def test_an_exactly_once_sink_whose_user_may_not_acknowledge_writes_nothing(server, r, caplog):
    r.xadd("s", {"n": 1})
    r.execute_command("ACL", "SETUSER", "writer", "reset", "on", ">pw", "~*", "+@all", "-xack")
    source = Stream.from_redis_consumer_group("s", "g", "c", start_id="0")
    sink = source.map(lambda e: {"n": e.fields["n"]}).to_redis_stream(
        "out", exactly_once=True, url=user_url(server, "writer"))
    with caplog.at_level(logging.ERROR, logger="streamz_redis"):
        source.start()
        wait_for(lambda: sink.metrics()["failed"] == 1)
    assert r.xlen("out") == 0 and pending(r, "s", "g") == 1
    assert any("may not run XADD" in m for m in caplog.messages)


# --------------------------------------------------------------------------
# The exactly-once script itself, fed by the sink's own builder: what it does
# with elements that a pipeline makes rarely
# --------------------------------------------------------------------------


class _AckOf:
    """An upstream entry's acknowledgement, as the script is given it."""

    def __init__(self, *command):
        self._command = command

    def command(self):
        return self._command


def exactly_once_script_runs(r, sink, elements, acks):
    writes = []
    for element, ack in zip(elements, acks):
        write = streamz_redis._Write(element, "out", element, [])
        write.acks = [ack]
        writes.append(write)
    for command, _ in sink.plan.commands(writes):
        try:
            r.execute_command(*command)
        except redis.ResponseError:
            pass


def test_two_elements_carrying_one_entry_are_written_once_as_two_scripts_would(server, r):
    entry = r.xadd("orders", {"n": 0}).decode()
    r.xgroup_create("orders", "billing", "0")
    r.xreadgroup("billing", "c", {"orders": ">"})
    sink = Stream().to_redis_stream("out", exactly_once=True)
    ack = _AckOf("XACK", "orders", "billing", entry)
    exactly_once_script_runs(r, sink, [{"n": 0}, {"n": 1}], [ack, ack])
    assert r.xlen("out") == 1  # each in its own script: the second finds it acknowledged
    # A reliable list holding one item twice, with one copy left: one write.
    r.delete("out")
    r.rpush("processing", "x")
    sink = Stream().to_redis_list("out", exactly_once=True)
    ack = _AckOf("LREM", "processing", 1, "x")
    exactly_once_script_runs(r, sink, ["a", "b"], [ack, ack])
    assert r.lrange("out", 0, -1) == [b"a"] and r.llen("processing") == 0


def test_a_stream_entry_too_large_for_a_script_is_written_apart_exactly_once(server, r, caplog):
    for n in range(3):
        r.xadd("orders", {"n": n})
    source = Stream.from_redis_consumer_group("orders", "billing", "c", start_id="0")
    huge = {f"f{i}": "v" for i in range(5000)}  # 10,000 arguments: beyond Lua's unpack()
    sink = source.map(lambda e: dict(huge, n=e.fields["n"]) if e.fields["n"] == "1" else dict(e.fields)) \
        .to_redis_stream("out", exactly_once=True)
    with caplog.at_level(logging.ERROR, logger="streamz_redis"):
        source.start()
        wait_for(lambda: pending(r, "orders", "billing") == 0 and sink.metrics()["written"] == 3)
    assert sink.metrics()["failed"] == 0 and not caplog.messages
    entries = r.xrange("out")
    assert [fields[b"n"] for _, fields in entries] == [b"0", b"1", b"2"]
    assert len(entries[1][1]) == 5001
    assert not r.exists("{out}:exactly-once")  # its reservation is gone with its acknowledgement


HUGE = {f"f{i}": 1 / (i + 3) if i % 2 else i for i in range(5000)}  # 10,000 arguments


@requires_redis_7
def test_a_stream_entry_written_apart_needs_only_the_documented_rules(server, r):
    # Permissions (ACL) in docs/production.rst, and Exactly once in docs/guarantees.rst.
    documented = " ".join(" ".join((HERE / "docs" / f"{page}.rst").read_text().split())
                          for page in ("production", "guarantees"))
    rules = ("+type +xgroup|create +xreadgroup +xack +xpending +client|id +client|unblock "
             "+xadd +evalsha +script|load +info "
             "+eval +hget +hset +hdel +xrange +exists +xinfo|stream +time").split()
    assert all(rule in documented for rule in rules)
    r.execute_command("ACL", "SETUSER", "least", "reset", "on", ">pw", "+ping", "+multi", "+discard",
                      *rules, "~S", "~S:dead-letter", "~O", "~{O}:exactly-once")
    url = user_url(server, "least")
    r.xadd("S", {"n": 0})
    source = Stream.from_redis_consumer_group("S", "g", "c", start_id="0", url=url)
    sink = source.map(lambda e: HUGE).to_redis_stream("O", exactly_once=True, url=url)
    source.start()
    wait_for(lambda: sink.metrics()["written"] + sink.metrics()["failed"] == 1)
    assert sink.metrics()["failed"] == 0 and r.xlen("O") == 1
    wait_for(lambda: pending(r, "S", "g") == 0)


def reserve_or_acknowledge(r, ack, fields=HUGE):
    from streamz_redis_exactly_once import RESERVE_OR_ACKNOWLEDGE, fields_digest, reservations_key
    command, key, first, second = ack.command()
    digest = fields_digest([part for pair in fields.items() for part in pair])
    return r.eval(RESERVE_OR_ACKNOWLEDGE, 3, "out", reservations_key("out"), key,
                  digest, command, first, second)


def test_a_stream_entry_written_apart_and_not_acknowledged_before_a_crash_is_acknowledged_on_replay(
        server, r):
    entry = r.xadd("orders", {"n": 0}).decode()
    r.xgroup_create("orders", "billing", "0")
    r.xreadgroup("billing", "c", {"orders": ">"})
    ack = _AckOf("XACK", "orders", "billing", entry)
    reserved = reserve_or_acknowledge(r, ack)
    assert reserve_or_acknowledge(r, ack) == reserved  # not written yet: the same id again
    huge = HUGE
    r.xadd("out", huge, id=reserved)  # ... and the worker is killed here: not acknowledged
    assert pending(r, "orders", "billing") == 1
    source = Stream.from_redis_consumer_group("orders", "billing", "c", start_id="0")
    sink = source.map(lambda e: huge).to_redis_stream("out", exactly_once=True)
    source.start()  # the same consumer: its pending entry is replayed
    wait_for(lambda: pending(r, "orders", "billing") == 0 and sink.metrics()["written"] == 1)
    assert r.xlen("out") == 1 and not r.exists("{out}:exactly-once")


def test_a_reservation_the_stream_moved_past_is_replaced_and_an_acknowledged_entry_is_done(server, r):
    entry = r.xadd("orders", {"n": 0}).decode()
    r.xgroup_create("orders", "billing", "0")
    r.xreadgroup("billing", "c", {"orders": ">"})
    ack = _AckOf("XACK", "orders", "billing", entry)
    first = reserve_or_acknowledge(r, ack)
    # Another writer's entry at the very id reserved is not taken for ours.
    taken = r.xadd("out", {"by": "another writer"}, id=first).decode()
    second = reserve_or_acknowledge(r, ack).decode()
    assert second != taken and tuple(map(int, second.split("-"))) > tuple(map(int, taken.split("-")))
    later = r.xadd("out", {"by": "another writer"}).decode()  # the stream moves past it
    third = reserve_or_acknowledge(r, ack).decode()
    assert tuple(map(int, third.split("-"))) > tuple(map(int, later.split("-")))
    assert pending(r, "orders", "billing") == 1
    r.xack("orders", "billing", entry)  # another consumer took it over and acknowledged it
    assert reserve_or_acknowledge(r, ack) == b"done"
    assert not r.exists("{out}:exactly-once")


def test_an_element_too_large_for_a_script_fails_alone(server, r):
    ids = [r.xadd("orders", {"n": n}).decode() for n in range(2)]
    r.xgroup_create("orders", "billing", "0")
    r.xreadgroup("billing", "c", {"orders": ">"})
    sink = Stream().to_redis_stream("out", exactly_once=True)
    huge = {f"f{i}": "v" for i in range(4100)}  # > 8,000 arguments: Lua's unpack() refuses
    acks = [_AckOf("XACK", "orders", "billing", i) for i in ids]
    exactly_once_script_runs(r, sink, [{"n": 0}, huge], acks)
    assert r.xlen("out") == 1  # the small neighbour is written and acknowledged
    assert pending(r, "orders", "billing") == 1


# --------------------------------------------------------------------------
# Exactly-once counters: hashes, sorted sets, keys, sets and commands
# --------------------------------------------------------------------------


KEY_SINKS = {
    "hash": (lambda s: s.map(lambda e: {f"k{int(e.fields['n']) % 3}": 1}).to_redis_hash(
        "totals", increment=True, ttl=600, exactly_once=True),
             lambda r: {k.decode(): int(v) for k, v in r.hgetall("totals").items()}),
    "sorted_set": (lambda s: s.map(lambda e: (f"k{int(e.fields['n']) % 3}", 0.5)).to_redis_sorted_set(
        "totals", increment=True, ttl=600, exactly_once=True),
                   lambda r: {k.decode(): v * 2 for k, v in r.zrange("totals", 0, -1, withscores=True)}),
    "key": (lambda s: s.map(lambda e: (f"totals:k{int(e.fields['n']) % 3}", 1)).to_redis_key(
        increment=True, ttl=600, exactly_once=True),
            lambda r: {k.decode()[7:]: int(r.get(k)) for k in r.keys("totals:*")}),
    "set": (lambda s: s.map(lambda e: ("totals", e.id)).to_redis_set(ttl=600, exactly_once=True),
            lambda r: {"k0": r.scard("totals") // 3, "k1": r.scard("totals") // 3,
                       "k2": r.scard("totals") // 3}),
    "command": (lambda s: s.map(lambda e: ("HINCRBY", "totals", f"k{int(e.fields['n']) % 3}", 1))
                .to_redis_command(exactly_once=True),
                lambda r: {k.decode(): int(v) for k, v in r.hgetall("totals").items()}),
}


@pytest.mark.parametrize("kind", KEY_SINKS)
def test_an_exactly_once_sink_of_keys_writes_and_acknowledges_each_entry_in_one_script(server, r, kind):
    make, totals = KEY_SINKS[kind]
    for n in range(300):
        r.xadd("views", {"n": n})
    source = Stream.from_redis_consumer_group("views", "counting", "c", start_id="0")
    sink = make(source)
    r.config_resetstat()
    source.start()
    wait_for(lambda: pending(r, "views", "counting") == 0 and sink.metrics()["written"] == 300)
    source.stop()
    assert totals(r) == {"k0": 100, "k1": 100, "k2": 100}
    assert call_count(r, "xack") == 300  # each inside a script
    # Consecutive writes to one key go in one script; the key sink's keys take turns.
    assert call_count(r, "evalsha") == 300 if kind == "key" else call_count(r, "evalsha") < 300
    if kind != "command":
        assert max(r.ttl(key) for key in r.keys("totals*")) > 500  # the EXPIRE ran in the script


def key_sink_script_runs(r, sink, elements, acks):
    """The script the sink's own builder makes for ``elements``, each
    carrying its acknowledgement, run once."""
    writes = []
    for element, ack in zip(elements, acks):
        write = sink._prepare_write(element, [])
        write.acks = [ack]
        writes.append(write)
    replies = []
    r.script_load(streamz_redis_exactly_once.WRITE_AND_ACKNOWLEDGE)
    for command, _ in sink.plan.commands(writes):
        if command[:2] == ("SCRIPT", "LOAD"):
            continue
        try:
            replies.append(r.execute_command(*command))
        except redis.ResponseError as refused:
            replies.append(refused)
    return replies


def test_an_exactly_once_counter_sent_twice_counts_once(server, r):
    entry = r.xadd("views", {"n": 0}).decode()
    r.xgroup_create("views", "counting", "0")
    r.xreadgroup("counting", "c", {"views": ">"})
    sink = Stream().to_redis_hash("totals", increment=True, exactly_once=True)
    ack = _AckOf("XACK", "views", "counting", entry)
    key_sink_script_runs(r, sink, [{"a": 1, "b": 2.5}], [ack])
    key_sink_script_runs(r, sink, [{"a": 1, "b": 2.5}], [ack])  # a reply lost, sent again
    assert r.hgetall("totals") == {b"a": b"1", b"b": b"2.5"} and pending(r, "views", "counting") == 0


def acks_of(r, n, stream="views", group="counting"):
    ids = [r.xadd(stream, {"n": i}).decode() for i in range(n)]
    r.xgroup_create(stream, group, "0")
    r.xreadgroup(group, "c", {stream: ">"})
    return [_AckOf("XACK", stream, group, i) for i in ids]


def test_an_exactly_once_counter_that_holds_no_number_is_refused_alone_with_nothing_written(server, r):
    acks = acks_of(r, 2)
    r.hset("totals", "b", "not a number")
    sink = Stream().to_redis_hash("totals", increment=True, exactly_once=True)
    [statuses] = key_sink_script_runs(r, sink, [{"a": 1}, {"a": 1, "b": 1}], acks)
    assert statuses[0] == 1 and b"totals field b holds no integer to add to" in statuses[1]
    # The second element wrote nothing (not even its field a), its entry waits.
    assert r.hget("totals", "a") == b"1" and pending(r, "views", "counting") == 1


@pytest.mark.parametrize("held", ["007", "-0", str(2**63 - 1), "1e3"])
def test_an_exactly_once_integer_counter_is_refused_where_redis_would_refuse_it_half_way(server, r, held):
    acks = acks_of(r, 2)
    r.hset("totals", "b", held)
    sink = Stream().to_redis_hash("totals", increment=True, exactly_once=True)
    [statuses] = key_sink_script_runs(r, sink, [{"a": 1}, {"a": 1, "b": 1}], acks)
    assert statuses[0] == 1 and statuses[1].startswith(b"!")
    assert r.hget("totals", "a") == b"1" and r.hget("totals", "b") == held.encode()
    assert pending(r, "views", "counting") == 1


def test_an_exactly_once_float_then_an_integer_into_one_field_is_refused_before_writing(server, r):
    acks = acks_of(r, 2)
    sink = Stream().to_redis_hash("totals", increment=True, exactly_once=True)
    [statuses] = key_sink_script_runs(r, sink, [{"a": 0.5}, {"a": 1}], acks)
    assert statuses[0] == 1 and b"holds a fraction" in statuses[1]
    assert r.hget("totals", "a") == b"0.5" and pending(r, "views", "counting") == 1


def test_an_exactly_once_command_redis_refuses_is_not_written_and_its_neighbours_are(server, r):
    acks = acks_of(r, 3)
    sink = Stream().to_redis_command(exactly_once=True)
    [statuses] = key_sink_script_runs(r, sink, [("INCRBY", "c", 1), ("INCRBY", "c", "x"),
                                                 ("LPUSH", "c", "y")], acks)
    assert statuses[0] == 1 and b"is no integer" in statuses[1] and b"WRONGTYPE" in statuses[2]
    assert r.get("c") == b"1" and pending(r, "views", "counting") == 2  # each written once at most


def test_an_exactly_once_element_whose_entries_were_partly_taken_over_is_left_pending(server, r):
    acks = acks_of(r, 3)
    r.xclaim("views", "counting", "other", 0, [acks[1]._command[3]])
    r.xack("views", "counting", acks[1]._command[3])  # another consumer took it over and counted it
    sink = Stream().to_redis_key("total", increment=True, exactly_once=True)
    write = sink._prepare_write(3, [])
    write.acks = acks  # one element (a batch) of three entries
    [command] = [c for c, _ in sink.plan.commands([write]) if c[0] == "EVALSHA"]
    r.script_load(streamz_redis_exactly_once.WRITE_AND_ACKNOWLEDGE)
    [status] = r.execute_command(*command)
    assert b"1 of its 3 entries were taken over" in status
    assert not r.exists("total") and pending(r, "views", "counting") == 2


def test_an_exactly_once_command_without_a_key_is_refused_and_its_entry_waits(server, r, caplog):
    r.xadd("views", {"n": 0})
    source = Stream.from_redis_consumer_group("views", "counting", "c", start_id="0")
    sink = source.map(lambda e: ("PING",)).to_redis_command(exactly_once=True)
    with caplog.at_level(logging.ERROR, logger="streamz_redis"):
        source.start()
        wait_for(lambda: sink.metrics()["failed"] == 1)
    assert any("a command without a key" in m for m in caplog.messages)
    assert pending(r, "views", "counting") == 1


# --------------------------------------------------------------------------
# A worker killed with SIGKILL, again and again
# --------------------------------------------------------------------------


def sigkill_three_times(server, r, tmp_path, worker, args, progress, group, total, step=1):
    """Run the ``worker`` script (with the server's URL and ``args``) and
    SIGKILL it three times, each when ``progress()`` has gone a seeded 500
    to 3,000 (over ``step``) further, restarting it under the same consumer
    name (it replays its pending entries); then wait until ``group`` has
    read and acknowledged all ``total`` entries of "numbers"."""
    seed = int(os.environ.get("STREAMZ_REDIS_TEST_SEED", time.time_ns() % 10**6))
    print(f"seed {seed} (STREAMZ_REDIS_TEST_SEED={seed} replays it)")
    rng = random.Random(seed)
    script = tmp_path / "worker.py"
    script.write_text(worker)
    command = [sys.executable, str(script), server.url, *args]

    def started():
        worker = subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE,
                                  stderr=open(tmp_path / "worker.log", "ab"))
        assert worker.stdout.readline() == b"started\n"
        return worker

    worker = started()
    try:
        for _ in range(3):
            at = min(progress() + rng.randint(500, 3000) // step, total)
            wait_for(lambda: progress() >= at, timeout=60)
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            worker = started()
        wait_for(lambda: entries_read(r, "numbers", group) == total
                 and pending(r, "numbers", group) == 0, timeout=120)
    finally:
        worker.kill()
        worker.wait()


EXACTLY_ONCE_WORKER = textwrap.dedent(
    """
    import sys, threading
    from streamz import Stream
    url, shape, exactly_once = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    source = Stream.from_redis_consumer_group("numbers", "copiers", "copier-1", url=url, count=50)
    if shape == "stream":
        source.map(lambda e: {"source": e.id}).to_redis_stream(
            "copies", url=url, exactly_once=exactly_once)
    elif shape == "list":
        source.map(lambda e: e.id).to_redis_list("copies", url=url, exactly_once=exactly_once)
    else:  # many entries in one output
        source.partition(100, timeout=0.2).map(lambda es: ",".join(e.id for e in es)).to_redis_list(
            "copies", url=url, exactly_once=exactly_once)
    source.start()
    print("started", flush=True)
    threading.Event().wait()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("shape, exactly_once", [
    ("stream", True), ("list", True), ("partition", True), ("stream", False),
])
def test_three_sigkills_leave_each_input_exactly_once_in_the_output(server, r, tmp_path, shape, exactly_once):
    total = 20_000
    r.xgroup_create("numbers", "copiers", "0", mkstream=True)
    source_ids = add_numbers(r, "numbers", total)

    def copies():
        if shape == "stream":
            return [fields[b"source"].decode() for _, fields in r.xrange("copies")]
        return [i for item in r.lrange("copies", 0, -1) for i in item.decode().split(",")]

    def output_length():
        return r.xlen("copies") if shape == "stream" else r.llen("copies")

    sigkill_three_times(server, r, tmp_path, EXACTLY_ONCE_WORKER, [shape, "1" if exactly_once else "0"],
                        output_length, "copiers", total, step=100 if shape == "partition" else 1)
    copied = copies()
    duplicates = len(copied) - len(set(copied))
    print(f"{shape}, exactly_once={exactly_once}: {len(copied)} outputs, {duplicates} duplicates")
    assert set(copied) == set(source_ids)  # nothing lost
    if exactly_once:
        assert duplicates == 0
    else:
        assert duplicates > 0  # what exactly_once is for: the test can fail


COUNTING_WORKER = textwrap.dedent(
    """
    import sys, threading
    from streamz import Stream
    url, shape, exactly_once = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    source = Stream.from_redis_consumer_group("numbers", "counters", "counter-1", url=url, count=50)
    if shape == "hash":
        source.map(lambda e: {f"k{int(e.fields['n']) % 10}": int(e.fields["n"]) % 7 + 1}).to_redis_hash(
            "totals", increment=True, url=url, exactly_once=exactly_once)
    else:
        source.map(lambda e: (f"k{int(e.fields['n']) % 10}", int(e.fields["n"]) % 7 + 1)).to_redis_sorted_set(
            "totals", increment=True, url=url, exactly_once=exactly_once)
    source.start()
    print("started", flush=True)
    threading.Event().wait()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("shape, exactly_once", [("hash", True), ("sorted_set", True), ("hash", False)])
def test_three_sigkills_leave_every_exactly_once_counter_exact(server, r, tmp_path, shape, exactly_once):
    total = 20_000
    r.xgroup_create("numbers", "counters", "0", mkstream=True)
    add_numbers(r, "numbers", total)
    expected = {f"k{k}": sum(n % 7 + 1 for n in range(k, total, 10)) for k in range(10)}

    def totals():
        if shape == "hash":
            return {k.decode(): int(v) for k, v in r.hgetall("totals").items()}
        return {k.decode(): int(v) for k, v in r.zrange("totals", 0, -1, withscores=True)}

    sigkill_three_times(server, r, tmp_path, COUNTING_WORKER, [shape, "1" if exactly_once else "0"],
                        lambda: entries_read(r, "numbers", "counters"), "counters", total)
    counted = totals()
    over = sum(counted.values()) - sum(expected.values())
    print(f"{shape}, exactly_once={exactly_once}: {sum(counted.values())} counted, "
          f"{sum(expected.values())} sent, {over} over")
    if exactly_once:
        assert counted == expected
    else:
        assert over > 0 and all(counted[k] >= expected[k] for k in expected)  # what exactly_once prevents
