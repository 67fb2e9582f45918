"""Operating a stream: the command line (python -m streamz_redis info,
pending, dead-letters, redrive, tail, trim), trimming what every group has
acknowledged (trim_acknowledged), and removing idle consumers
(remove_idle_consumers). The command line on a cluster is in
test_streamz_redis_cluster.py.

The servers are the tests' own (see conftest.py).
"""

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from streamz import Stream

from conftest import backlog, cli, free_port, GroupWorkers, pending, wait_for


HERE = Path(__file__).parent


# --------------------------------------------------------------------------
# The command line: info, pending, dead-letters, redrive, tail
# --------------------------------------------------------------------------


def two_groups_at_different_positions(r):
    """Ten orders; "billing" has delivered four (two acked, two pending with
    biller-1), "shipping" seven (all acked). The ids, in order."""
    ids = [r.xadd("orders", {"n": n}).decode() for n in range(10)]
    r.xgroup_create("orders", "billing", "0")
    r.xgroup_create("orders", "shipping", "0")
    r.xreadgroup("billing", "biller-1", {"orders": ">"}, count=4)
    r.xack("orders", "billing", ids[0], ids[1])
    r.xreadgroup("shipping", "shipper-1", {"orders": ">"}, count=7)
    r.xack("orders", "shipping", *ids[:7])
    return ids


def poison_entries_dead_lettered(r, stream, poison):
    """Run a consumer whose processing raises on the entries whose "n" is in
    ``poison`` until they reach the dead-letter stream; the source's ids."""
    def process(entry):
        if int(entry.fields["n"]) in poison:
            raise ValueError("poison")

    ids = [r.xadd(stream, {"n": n, "note": f"order {n}"}).decode() for n in range(5)]
    source = Stream.from_redis_consumer_group(
        stream, "billing", "biller-1", claim_idle=0.05, max_deliveries=1, start_id="0"
    )
    source.map(process).sink(lambda _: None)
    source.start()
    wait_for(lambda: r.exists(f"{stream}:dead-letter") and r.xlen(f"{stream}:dead-letter") == len(poison)
             and pending(r, stream, "billing") == 0)
    # Counted once the read's last move has answered (Redis moved them
    # first); waited for before stop(), which may cancel a read still waiting.
    wait_for(lambda: source.metrics()["dead_lettered"] == len(poison))
    source.stop()
    assert source.metrics()["dead_lettered"] == len(poison)
    return ids


def test_info_shows_each_group_with_its_lag_pending_and_consumers(server, r):
    ids = two_groups_at_different_positions(r)
    figures = json.loads(cli("info", "orders", "--json").stdout)
    assert figures["stream"] == "orders" and figures["length"] == 10
    assert (figures["first_id"], figures["last_id"]) == (ids[0], ids[-1])
    billing, shipping = sorted(figures["groups"], key=lambda g: g["name"])
    assert (billing["name"], billing["lag"], billing["pending"]) == ("billing", 6, 2)
    assert billing["last_delivered_id"] == ids[3]
    [biller] = billing["consumers"]
    assert (biller["name"], biller["pending"]) == ("biller-1", 2) and biller["idle_ms"] >= 0
    assert (shipping["lag"], shipping["pending"]) == (3, 0)

    text = cli("info", "orders").stdout
    assert f"orders: 10 entries, first {ids[0]}, last {ids[-1]}" in text
    assert f"group billing: lag 6, pending 2, last delivered {ids[3]}" in text
    assert "consumer biller-1: pending 2" in text


def test_info_counts_the_lag_where_redis_does_not_give_it(server, r):
    ids = two_groups_at_different_positions(r)
    r.xdel("orders", ids[8])  # Redis 7 no longer knows the lag of a group behind a deletion
    figures = json.loads(cli("info", "orders", "--json").stdout)
    lags = {group["name"]: group["lag"] for group in figures["groups"]}
    assert lags == {"billing": 5, "shipping": 2}


def test_pending_lists_the_oldest_pending_entries_with_their_consumer(server, r):
    ids = two_groups_at_different_positions(r)
    out = cli("pending", "orders", "billing", "--count", "1").stdout.splitlines()
    assert re.fullmatch(rf"{ids[2]}  consumer biller-1  idle \d+ ms  deliveries 1", out[0])
    assert out[1] == "2 pending in group billing of stream orders, the oldest 1 shown"


def test_dead_letters_are_shown_and_redriven_to_their_stream(server, r):
    ids = poison_entries_dead_lettered(r, "orders", poison={1, 3})
    shown = cli("dead-letters", "orders").stdout.splitlines()
    assert f"source orders {ids[1]}  deliveries 2" in shown[0]
    assert json.loads(shown[0].split("  ")[-1]) == {"n": "1", "note": "order 1"}
    assert shown[-1] == "2 entries in orders:dead-letter"

    dry = cli("redrive", "orders:dead-letter", "--dry-run").stdout
    assert "would redrive 2 entries" in dry and r.xlen("orders:dead-letter") == 2

    assert "redrove 1 entries" in cli("redrive", "orders:dead-letter", "--count", "1").stdout
    assert "redrove 1 entries" in cli("redrive", "orders:dead-letter").stdout
    assert r.xlen("orders:dead-letter") == 0
    redriven = [fields for _, fields in r.xrange("orders")][5:]
    assert redriven == [{b"n": b"1", b"note": b"order 1"}, {b"n": b"3", b"note": b"order 3"}]


def test_two_redrives_at_once_put_each_entry_back_exactly_once(server, r):
    for n in range(300):
        r.xadd("orders:dead-letter", {"n": n, "source_stream": "orders", "source_id": f"{n + 1}-0",
                                      "deliveries": 4})
    command = [sys.executable, "-m", "streamz_redis", "redrive", "orders:dead-letter"]
    redrives = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE)
                for _ in range(2)]
    for process in redrives:
        assert process.wait(timeout=60) == 0, process.stderr.read()
    back = [int(fields[b"n"]) for _, fields in r.xrange("orders")]
    assert sorted(back) == list(range(300))
    assert r.xlen("orders:dead-letter") == 0


def test_a_redrive_leaves_an_entry_whose_source_is_not_a_stream_and_goes_on(server, r):
    r.set("not-a-stream", "x")
    for n, source in enumerate(["orders", "not-a-stream", "orders"]):
        r.xadd("orders:dead-letter", {"n": n, "source_stream": source, "source_id": f"{n + 1}-0",
                                      "deliveries": 4})
    out = cli("redrive", "orders:dead-letter", "--to", "orders", "--to", "not-a-stream", check=False)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "not-a-stream is not a stream; left in place" in out.stderr
    assert "redrove 2 entries from orders:dead-letter; 1 left in place" in out.stdout
    assert [fields[b"n"] for _, fields in r.xrange("orders")] == [b"0", b"2"]
    assert [fields[b"n"] for _, fields in r.xrange("orders:dead-letter")] == [b"1"]


def test_a_redrive_writes_only_to_the_streams_its_dead_letter_stream_belongs_to(server, r):
    # Whoever may write the dead-letter stream names the key a redrive writes
    # to: another stream, a key of another application, the dead-letter
    # stream itself. Only orders is orders:dead-letter's, unless --to says.
    r.set("config", "precious")
    for n, source in enumerate(["orders", "config", "orders:dead-letter", "payments", "orders"]):
        r.xadd("orders:dead-letter", {"n": n, "source_stream": source, "source_id": f"{n + 1}-0",
                                      "deliveries": 4})
    out = cli("redrive", "orders:dead-letter", check=False)
    assert out.returncode == 1
    assert out.stderr.count("is not orders; left in place") == 3, out.stderr
    assert "redrove 2 entries from orders:dead-letter; 3 left in place" in out.stdout
    assert [fields[b"n"] for _, fields in r.xrange("orders")] == [b"0", b"4"]
    assert r.get("config") == b"precious" and not r.exists("payments")
    assert r.xlen("orders:dead-letter") == 3
    out = cli("redrive", "orders:dead-letter", "--to", "payments", check=False)
    assert "redrove 1 entries" in out.stdout and r.xlen("payments") == 1
    out = cli("redrive", "orders:dead-letter", "--to", "orders:dead-letter", check=False)
    assert out.returncode == 1 and "never redriven into itself" in out.stderr
    r.xadd("parked", {"n": 9, "source_stream": "orders", "source_id": "9-0", "deliveries": 4})
    out = cli("redrive", "parked", check=False)  # no name to tell where its entries belong
    assert out.returncode == 1 and "--to STREAM" in out.stderr and r.xlen("parked") == 1


def test_names_and_values_are_printed_with_control_characters_escaped(server, r):
    sneaky = "orders\x1b[2J\rgone"  # clear the screen, go back to the line's start
    r.xadd("orders:dead-letter", {"note": "a\nb", "source_stream": sneaky, "source_id": "1-0",
                                  "deliveries": 4})
    r.xgroup_create("orders", "billing", "0", mkstream=True)
    r.xadd("orders", {"n": 1})
    r.xreadgroup("billing", "worker\x1b]0;owned\x07", {"orders": ">"})
    out = cli("redrive", "orders:dead-letter", "--dry-run", "--to", sneaky, check=False)
    printed = out.stdout + out.stderr + cli("pending", "orders", "billing").stdout
    assert "\x1b" not in printed and "\r" not in printed and "\x07" not in printed
    assert "orders\\x1b[2J\\rgone" in out.stdout and "worker\\x1b]0;owned\\x07" in printed


@pytest.mark.parametrize("signal_number, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_ends_a_redrive_between_two_entries(server, r, signal_number, code):
    total = 20_000
    with r.pipeline(transaction=False) as pipe:
        for n in range(total):
            pipe.xadd("orders:dead-letter", {"n": n, "source_stream": "orders",
                                             "source_id": f"{n + 1}-0", "deliveries": 4})
        pipe.execute()
    redrive = subprocess.Popen(
        [sys.executable, "-m", "streamz_redis", "redrive", "orders:dead-letter"], cwd=HERE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: r.xlen("orders") >= 100, timeout=30)
        redrive.send_signal(signal_number)
        out, err = redrive.communicate(timeout=10)
    finally:
        redrive.kill()
    assert redrive.returncode == code, err
    back = [int(fields[b"n"]) for _, fields in r.xrange("orders")]
    last = out.splitlines()[-1]
    assert last == f"interrupted: redrove {len(back)} entries from orders:dead-letter", last
    assert len(back) < total and back == list(range(len(back)))  # in order, each once
    assert r.xlen("orders:dead-letter") == total - len(back)
    assert err == ""


def test_a_count_that_is_not_a_positive_number_is_a_usage_error(server, r):
    for args in (["redrive", "dl", "--count", "0"], ["pending", "s", "g", "--count", "-1"],
                 ["dead-letters", "s", "--count", "x"],
                 ["pending", "s", "g", "--count", "99999999999999999999"]):  # more than Redis counts
        out = cli(*args, check=False)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, (args, out.stderr)
        assert "expected a positive whole number" in out.stderr


def test_the_streamz_redis_command_says_its_version_and_takes_url_before_or_after_the_command(
        server, r):
    import streamz_redis
    from importlib.metadata import version

    script = Path(sys.executable).with_name("streamz-redis")  # the console script, beside python
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"streamz-redis {streamz_redis.__version__}"
    assert streamz_redis.__version__ == version("streamz-redis")
    changelog = (Path(__file__).parent / "docs" / "changelog.rst").read_text()
    assert re.search(r"^(\d+\.\d+\.\d+)\n---", changelog, re.M).group(1) == streamz_redis.__version__
    r.xadd("orders", {"n": 1})
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}  # only --url says where
    for args in (["--url", server.url, "info", "orders"], ["info", "orders", "--url", server.url]):
        out = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0 and "stream orders: 1 entries" in out.stdout, (args, out.stderr)
    out = subprocess.run([str(script), "info", "missing", "--url", server.url],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.stderr.startswith("streamz-redis: error: no such stream"), out.stderr


def test_output_cut_short_by_a_closed_pipe_ends_quietly(server, r, tmp_path):
    for n in range(5000):  # more than a pipe holds, once head has gone
        r.xadd("orders:dead-letter", {"n": n, "source_stream": "orders", "source_id": f"{n + 1}-0",
                                      "deliveries": 4})
    out = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m streamz_redis dead-letters orders --count 5000 "
         "2>stderr.txt | head -1; echo ${PIPESTATUS[0]}; cat stderr.txt"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(HERE)),
    )
    first, status, *stderr = out.stdout.splitlines()
    assert "source orders" in first and status == "0" and stderr == [], out.stdout


def test_tail_prints_entries_as_they_arrive_until_ctrl_c(server, r):
    r.xadd("orders", {"n": "old"})
    tail = subprocess.Popen(
        [sys.executable, "-m", "streamz_redis", "tail", "orders"], cwd=HERE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert "tailing orders" in tail.stderr.readline()  # ready: what comes now is shown
        added = [r.xadd("orders", {"n": n}).decode() for n in range(3)]
        lines = [tail.stdout.readline() for _ in range(3)]
        tail.send_signal(signal.SIGINT)
        assert tail.wait(timeout=10) == 0
    finally:
        tail.kill()
    assert lines == [f'{entry_id} {{"n": "{n}"}}\n' for n, entry_id in enumerate(added)]
    assert "Traceback" not in tail.stderr.read()


def test_bad_input_is_one_line_on_stderr_and_a_non_zero_exit(server, r, private_server):
    r.set("not-a-stream", "x")
    locked = private_server("--requirepass", "right-secret")
    down = f"redis://127.0.0.1:{free_port()}/0"
    cases = {
        ("info", "missing"): (server.url, "no such stream: 'missing'"),
        ("info", "not-a-stream"): (server.url, "holds a string, not a stream"),
        ("pending", "orders", "no-group"): (server.url, "no such stream"),
        ("trim", "missing"): (server.url, "no such stream"),
        ("info", "orders"): (down, f"cannot reach Redis at {down}"),
        ("tail", "orders"): ("redis://127.0.0.1:notaport/0", "is not a valid Redis URL"),
        ("dead-letters", "orders"): (
            f"redis://:wrong-secret@127.0.0.1:{locked.port}/0", "redis://:***@127.0.0.1"
        ),
    }
    for args, (url, expected) in cases.items():
        out = cli(*args, url=url, check=False)
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr.count("\n") == 1 and expected in out.stderr, (args, out.stderr)
        assert "wrong-secret" not in out.stderr
    out = cli("info", "orders", url=f"redis://127.0.0.1:{locked.port}/0", check=False)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "needs a password" in out.stderr and "HELLO" not in out.stderr, out.stderr
    r.xadd("orders", {"n": 1})
    out = cli("pending", "orders", "no-group", url=server.url, check=False)
    assert out.returncode == 1 and "NOGROUP" in out.stderr and out.stderr.count("\n") == 1
    out = cli("no-such-command", check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1


# --------------------------------------------------------------------------
# Trimming: the trim command, and trim_acknowledged
# --------------------------------------------------------------------------


def test_trim_keeps_everything_a_group_still_needs(server, r):
    ids = two_groups_at_different_positions(r)
    # billing still needs its pending ids[2] and ids[3] and the undelivered
    # ids[4:]; shipping ids[7:]: only ids[0] and ids[1] may go.
    assert f"trimmed 2 entries from orders: kept from {ids[2]}, which group billing" in (
        cli("trim", "orders").stdout
    )
    assert [i.decode() for i, _ in r.xrange("orders")] == ids[2:]
    r.xack("orders", "billing", ids[2], ids[3])
    r.xreadgroup("billing", "biller-1", {"orders": ">"})  # all delivered, none acked
    r.xreadgroup("shipping", "shipper-1", {"orders": ">"})
    r.xack("orders", "shipping", *ids[7:])
    cli("trim", "orders")
    assert [i.decode() for i, _ in r.xrange("orders")] == ids[4:]  # billing's pending stay


def test_trim_leaves_a_stream_without_groups_alone(server, r):
    r.xadd("log", {"n": 1})
    assert "no consumer group" in cli("trim", "log").stdout
    assert r.xlen("log") == 1


def test_a_consumer_group_that_trims_keeps_what_another_group_still_needs(server, r):
    ids = [r.xadd("orders", {"n": n}).decode() for n in range(10)]
    r.xgroup_create("orders", "shipping", "0")  # another service, at its own pace
    r.xreadgroup("shipping", "shipper-1", {"orders": ">"}, count=7)
    r.xack("orders", "shipping", *ids[:7])
    source = Stream.from_redis_consumer_group(
        "orders", "billing", "biller-1", start_id="0", trim_acknowledged=True
    )
    billed = source.sink_to_list()
    source.start()
    wait_for(lambda: len(billed) == 10 and source.metrics()["trimmed"] == 7)
    assert [i.decode() for i, _ in r.xrange("orders")] == ids[7:]  # shipping's next three stay

    r.xreadgroup("shipping", "shipper-1", {"orders": ">"})
    r.xack("orders", "shipping", *ids[7:])
    wait_for(lambda: source.metrics()["trimmed"] == 9)
    assert [i.decode() for i, _ in r.xrange("orders")] == ids[9:]  # the last delivered id stays
    r.xadd("orders", {"n": 10})
    wait_for(lambda: len(billed) == 11)


# --------------------------------------------------------------------------
# Removing idle consumers (remove_idle_consumers)
# --------------------------------------------------------------------------


def test_remove_idle_consumers_needs_claim_idle():
    with pytest.raises(ValueError, match="remove_idle_consumers needs claim_idle"):
        Stream.from_redis_consumer_group("jobs", "workers", "w", remove_idle_consumers=60)


def test_an_idle_consumer_is_removed_only_once_nothing_is_pending_under_its_name(server, r):
    ids = backlog(r, 10)
    r.xreadgroup("workers", "gone", {"jobs": ">"}, count=4)  # then it died, a minute ago
    r.xclaim("jobs", "workers", "gone", 0, ids[:4], idle=60_000)
    r.xgroup_createconsumer("jobs", "workers", "never-read")
    source = Stream.from_redis_consumer_group("jobs", "workers", "alive", claim_idle=2,
                                              remove_idle_consumers=0.5)
    seen = source.sink_to_list()
    source.start()
    wait_for(lambda: sorted(e.id for e in seen) == sorted(ids)
             and pending(r, "jobs", "workers") == 0)
    wait_for(lambda: [c["name"] for c in r.xinfo_consumers("jobs", "workers")] == [b"alive"])
    # Redis has removed them before the removal's reply reaches the source.
    wait_for(lambda: source.metrics()["removed_consumers"] == 2)
    assert len(seen) == 10  # the four "gone" held were claimed, not dropped


def test_live_consumers_of_an_idle_stream_are_never_removed(server, r):
    # Before Redis 7.2 a blocked XREADGROUP that returns nothing leaves the
    # consumer's idle growing: three live consumers of an idle stream looked
    # idle, and were removed for as long as it stayed idle.
    r.xgroup_create("jobs", "workers", "$", mkstream=True)
    live = [Stream.from_redis_consumer_group("jobs", "workers", f"live {n}", timeout=0.2)
            for n in range(3)]
    for source in live:
        source.sink(lambda entry: None)
        source.start()
    r.xgroup_createconsumer("jobs", "workers", "dead")  # no connection reads as it
    remover = Stream.from_redis_consumer_group("jobs", "workers", "remover", timeout=0.2,
                                               claim_idle=0.2, remove_idle_consumers=0.5)
    remover.start()

    def names():
        return {c["name"].decode() for c in r.xinfo_consumers("jobs", "workers")}

    wait_for(lambda: "dead" not in names())  # several sweeps, everyone idle for 0.5 s
    assert names() == {"live 0", "live 1", "live 2", "remover"}
    # The figure counts once the removal's reply is back: Redis removed it first.
    wait_for(lambda: remover.metrics()["removed_consumers"] == 1)


def test_a_second_process_reading_as_the_same_consumer_is_said_at_start(server, r, caplog):
    first = Stream.from_redis_consumer_group("jobs", "workers", "worker-1")
    first.start()
    second = Stream.from_redis_consumer_group(["mail", "jobs"], "workers", "worker-1")  # a copy-paste
    other = Stream.from_redis_consumer_group("jobs", "workers", "worker-2")
    elsewhere = Stream.from_redis_consumer_group("mail", "workers", "worker-1")  # another stream's group
    with caplog.at_level(logging.ERROR, logger="streamz_redis"):
        other.start()
        elsewhere.start()
        assert not caplog.messages
        second.start()
    [line] = [m for m in caplog.messages if "already reads as consumer 'worker-1'" in m]
    assert "give each process a name of its own" in line


@pytest.mark.slow
def test_consumers_with_generated_names_come_and_go_and_the_dead_ones_are_removed(
    server, r, tmp_path
):
    import uuid

    # STREAMZ_REDIS_TEST_SEED=<n> replays a run: the seed is printed.
    seed = int(os.environ.get("STREAMZ_REDIS_TEST_SEED", "20240611"))
    print(f"\nrandom seed {seed} (STREAMZ_REDIS_TEST_SEED)")
    rng = random.Random(seed)
    ids = backlog(r, 2000)
    workers = GroupWorkers(server, tmp_path)
    options = dict(claim_idle=0.5, remove_idle_consumers=1.0, timeout=0.2, count=10,
                   work_seconds=0.002)

    def new_worker():
        name = f"worker-{uuid.UUID(int=rng.getrandbits(128)).hex[:8]}"  # as a uuid4() would be
        workers.start(name, **options)
        workers.go(name)
        return name

    def processed():
        return r.llen("processed")

    def consumers():
        return {c["name"].decode(): c["pending"] for c in r.xinfo_consumers("jobs", "workers")}

    live, dead, in_flight_at_kills = [new_worker(), new_worker()], [], 0
    try:
        for _ in range(2):  # kill one at a random moment; a new name joins
            target = processed() + rng.randint(200, 600)
            wait_for(lambda: processed() >= target, timeout=30)
            victim = live.pop(rng.randrange(len(live)))
            workers.kill(victim)
            dead.append(victim)
            in_flight_at_kills += consumers().get(victim, 0)
            live.append(new_worker())
        wait_for(lambda: len(set(r.lrange("processed", 0, -1))) == len(ids)
                 and pending(r, "jobs", "workers") == 0 and not set(dead) & set(consumers()),
                 timeout=60, interval=0.05)
    finally:
        workers.kill_all()
    done = [i.decode() for i in r.lrange("processed", 0, -1)]
    lost, twice = len(set(ids) - set(done)), len(done) - len(set(done))
    print(f"2 killed ({in_flight_at_kills} entries in flight at the kills), {lost} lost, "
          f"{twice} processed twice; group now {consumers()}")
    assert lost == 0 and pending(r, "jobs", "workers") == 0
    assert twice <= in_flight_at_kills  # only what was in flight at a kill ran again
    assert not set(dead) & set(consumers())  # removed once their entries were claimed


def test_every_command_that_prints_data_prints_json_with_json_before_or_after_it(server, r):
    ids = poison_entries_dead_lettered(r, "orders", poison={1, 3})
    pending_entries = json.loads(cli("--json", "pending", "orders", "billing").stdout)
    assert pending_entries == {"stream": "orders", "group": "billing", "pending": 0, "oldest": []}
    dead = json.loads(cli("dead-letters", "orders", "--json").stdout)
    assert dead["stream"] == "orders:dead-letter" and dead["length"] == 2
    assert [(e["source_stream"], e["source_id"], e["fields"]["n"]) for e in dead["entries"]] == [
        ("orders", ids[1], "1"), ("orders", ids[3], "3")]
    dry = [json.loads(line) for line in cli("redrive", "orders:dead-letter", "--dry-run", "--json")
           .stdout.splitlines()]
    assert [line.get("to") for line in dry] == ["orders", "orders", None]
    assert dry[-1] == {"would_redrive": 2, "left_in_place": 0, "interrupted": False,
                       "from": "orders:dead-letter"}
    moved = [json.loads(line) for line in cli("--json", "redrive", "orders:dead-letter").stdout.splitlines()]
    assert [m["id"] for m in moved[:-1]] == [e["id"] for e in dead["entries"]]
    assert moved[-1]["redrove"] == 2
    trimmed = json.loads(cli("trim", "orders", "--json").stdout)
    assert trimmed["stream"] == "orders" and trimmed["trimmed"] >= 0 and trimmed["needed_by"] == "billing"
    assert json.loads(cli("info", "--json", "orders").stdout)["stream"] == "orders"


def test_a_long_redrive_prints_one_summary_line_progress_on_a_terminal_and_nothing_with_quiet(server, r):
    import pty

    total = 3000

    def dead_letters():
        with r.pipeline(transaction=False) as pipe:
            for n in range(total):
                pipe.xadd("orders:dead-letter", {"n": n, "source_stream": "orders",
                                                 "source_id": f"{n + 1}-0", "deliveries": 4})
            pipe.execute()

    dead_letters()
    out = cli("redrive", "orders:dead-letter")
    assert out.stdout.splitlines() == [f"redrove {total} entries from orders:dead-letter"]  # not 3,001
    dead_letters()
    assert cli("redrive", "orders:dead-letter", "--quiet").stdout == ""
    assert r.xlen("orders") == 2 * total and r.xlen("orders:dead-letter") == 0
    dead_letters()
    reader, writer = pty.openpty()  # stderr a terminal: the count and rate, rewritten in place
    try:
        done = subprocess.run([sys.executable, "-m", "streamz_redis", "redrive", "orders:dead-letter"],
                              cwd=HERE, stdout=subprocess.PIPE, stderr=writer, text=True, timeout=60)
        os.close(writer)
        writer = None
        shown = b""
        while True:
            try:
                chunk = os.read(reader, 65536)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if writer is not None:
            os.close(writer)
        os.close(reader)
    assert done.returncode == 0 and done.stdout.splitlines() == [f"redrove {total} entries from orders:dead-letter"]
    assert re.search(rb"\rredrive: [\d,]+ entries, [\d,]+/s", shown), shown
