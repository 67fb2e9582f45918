"""Redis Cluster for streamz-redis: the topology of a cluster.

``streamz_redis`` imports this module when a node is made with
``cluster=True`` or with a ``redis.asyncio.RedisCluster`` client, and never
otherwise. It answers the questions ``streamz_redis._OneServer`` answers for
one server, so that no other code asks which of the two it has:

- which keys one blocking read can wait on together (those of one slot), and
  which node's connection reads them (``key_groups``, ``reader_node``);
- who serves a slot after a MOVED, a failover or a migration
  (``forget_node``, which re-learns the slot map);
- whether the keys of one command or script share a slot
  (``check_same_slot``, ``slots_apart``: a clear CROSSSLOT error with the
  hash-tag hint);
- how a pipeline, a PUBLISH and a script go out on a cluster (``pipelined``,
  ``publish``, ``script_call``).
"""

import redis.asyncio
import redis.exceptions
from redis.crc import key_slot

from streamz_redis import CONNECTION_ERRORS, _safe_url

__all__ = ["ClusterTopology"]


class ClusterTopology:
    """How nodes of ``streamz_redis`` find the servers of their keys on a
    Redis Cluster."""

    # Each slot's blocking connection backs off on its own, up to this many
    # seconds: a failover takes a few seconds, and its slot reads again within
    # about this long of it; the other slots never wait.
    slot_backoff_cap = 1.0

    # start() while a master is down (a failover in progress takes a few
    # seconds) tries again for up to this long before it raises, so that a
    # supervisor that restarts a failed service does not crash-loop through
    # every failover.
    start_wait = 30.0

    def new_client(self, url, kwargs):
        return redis.asyncio.RedisCluster.from_url(url, **kwargs)

    def describe_url(self, url):
        return "Redis Cluster " + _safe_url(url)

    def describe(self, client):
        """The nodes a Redis Cluster client started from (no password)."""
        nodes = [node.name for node in client.nodes_manager.startup_nodes.values()]
        more = f" and {len(nodes) - 3} more" if len(nodes) > 3 else ""
        return f"Redis Cluster {', '.join(nodes[:3])}{more}"

    def key_groups(self, client, keys):
        """The keys of each slot: a command on several keys needs them all
        in one slot, not just on one node."""
        slots = {}
        for key in keys:
            slots.setdefault(client.keyslot(key), []).append(key)
        return list(slots.values())

    def check_same_slot(self, client, keys, why, advice):
        """Raise a clear error unless ``keys`` (name -> which parameter it
        is) all hash to one slot: commands and scripts on several keys need
        that."""
        slots = {key: client.keyslot(key) for key in keys}
        if len(set(slots.values())) > 1:
            named = ", ".join(f"{keys[key]} {key!r} (slot {slot})" for key, slot in slots.items())
            raise ValueError(f"CROSSSLOT on Redis Cluster: {named} must hash to one slot, as {why}; "
                             f"{advice}")

    shards_keys = True  # keys live in slots: slots_apart says which keys cannot go together

    def slots_apart(self, keys):
        """Why ``keys`` cannot go in one script: the slots they are in."""
        slots = {key: key_slot(key.encode() if isinstance(key, str) else key) for key in keys}
        if len(set(slots.values())) <= 1:
            return None
        return ", ".join(f"{k!r} in slot {n}" for k, n in slots.items())

    def reader_node(self, pooled, keys):
        """RedisCluster has no single-connection client: one of the node
        that owns the slot now, made from its connection arguments."""
        node = pooled.get_node_from_key(keys[0])
        return redis.asyncio.Redis(connection_pool=redis.asyncio.ConnectionPool(
            connection_class=node.connection_class, **node.connection_kwargs))

    async def forget_node(self, pooled, node, relearn):
        """Close the reader's node client; after an error, ask the cluster
        again which node owns the slot now (the next read tries again if it
        cannot say yet)."""
        if node is not pooled:
            await node.aclose()
        if relearn:
            try:
                await pooled.nodes_manager.initialize()
            except Exception:
                pass

    async def server_identity(self, client):
        """A cluster is no one server; its scripts are checked by slot."""
        return None

    async def pipelined(self, client, commands):
        """redis-py's cluster pipeline routes each command to its slot's
        node. It returns a lost connection as that command's reply instead
        of raising it: raised here, so that it is retried as a connection
        error wherever it is found."""
        async with client.pipeline(transaction=False) as pipe:
            for args in commands:
                pipe.execute_command(*args)
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, CONNECTION_ERRORS):
                raise reply
        return replies

    async def publish(self, client, commands):
        """redis-py refuses a pipelined PUBLISH on a cluster: one by one, and
        through execute_command (redis-py 5.0's RedisCluster has no
        publish())."""
        replies = []
        for command in commands:
            try:
                replies.append(await client.execute_command(*command))
            except redis.exceptions.RedisError as exc:
                if isinstance(exc, CONNECTION_ERRORS):
                    raise
                replies.append(exc)
        return replies

    def script_preamble(self, script):
        """Nothing: SCRIPT LOAD would reach one node only."""
        return []

    def script_call(self, script, sha):
        """Each script is an EVAL, which its slot's node runs (and caches)."""
        return ("EVAL", script)

    def check_pubsub(self, client, node):
        if not hasattr(client, "pubsub"):
            raise RuntimeError(
                f"{node}: Pub/Sub on a Redis Cluster needs redis-py 8 or newer (redis-py "
                f"{redis.__version__}'s asyncio RedisCluster has no pubsub()); upgrade it, or "
                f"give the url of one node without cluster=True: a PUBLISH reaches every node")
