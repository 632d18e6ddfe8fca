"""The process group's namespace under torchrun's shared store (pirl_fast.runtime.dist.fresh_namespace).

torchrun keeps one store for the whole job, so a group restarted under --max-restarts finds the keys its
dead predecessor wrote (this is what made tests/test_nodes.py's dying-rank test fail: a new rank read a
dead rank's gloo address). These tests plant such leftovers in a real TCPStore, the way a dead attempt
leaves them, and check that the live ranks still agree on one fresh namespace whatever order they start in.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from pirl_fast.runtime import dist

TIMEOUT = timedelta(seconds=60)


def start_server() -> TCPStore:
    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)


def join_all(server: TCPStore, world_size: int, delays: dict[int, float], timeout: timedelta = TIMEOUT) -> dict:
    """Each rank in its own thread with its own client, rank r starting after delays.get(r, 0) seconds;
    returns {rank: its PrefixStore or the exception it raised}."""
    results: dict = {}

    def rank_main(rank: int) -> None:
        time.sleep(delays.get(rank, 0.0))
        client = TCPStore("127.0.0.1", server.port, is_master=False, timeout=TIMEOUT)
        try:
            results[rank] = dist.fresh_namespace(client, rank, world_size, timeout, poll_s=0.005)
        except Exception as error:  # noqa: BLE001 - handed to the test to look at
            results[rank] = error

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def agree(stores: dict) -> None:
    """The ranks see one namespace: what rank 0 writes through its store, every rank reads through its own."""
    stores[0].set("hello-from-rank-0", "yes")
    for r, store in stores.items():
        assert store.get("hello-from-rank-0") == b"yes", f"rank {r} is in another namespace"


def plant_dead_attempt(server: TCPStore, world_size: int) -> None:
    """What a dead attempt leaves: its generation counted, every rank's hello, answer and confirm, and
    gloo's address keys in the shared store."""
    generation = server.add(f"{dist.NAMESPACE}/generation", 1)
    for r in range(1, world_size):
        nonce = f"dead{r}"
        server.set(f"{dist.NAMESPACE}/hello/{r}", nonce)
        server.set(f"{dist.NAMESPACE}/answer/{r}", f"{nonce}:{generation}")
        server.set(f"{dist.NAMESPACE}/confirm/{r}", f"{nonce}:{generation}")
    server.set(f"{dist.NAMESPACE}/{generation}/hello-from-rank-0", "stale")


@pytest.mark.parametrize("delays", [{}, {1: 0.3}, {0: 0.3}, {0: 0.2, 2: 0.4}], ids=["together", "rank1-late",
                                                                                      "rank0-late", "mixed"])
def test_a_restarted_group_agrees_on_a_namespace_its_dead_predecessor_never_used(delays):
    server = start_server()
    plant_dead_attempt(server, world_size=3)
    stores = join_all(server, 3, delays)
    assert all(not isinstance(s, Exception) for s in stores.values()), stores
    agree(stores)
    assert server.get(f"{dist.NAMESPACE}/generation") == b"2"  # the dead attempt had 1


def test_two_attempts_in_a_row_use_two_namespaces():
    server = start_server()
    first, second = join_all(server, 2, {}), join_all(server, 2, {1: 0.2})
    first[0].set("attempt", "first")
    second[0].set("attempt", "second")
    assert first[1].get("attempt") == b"first" and second[1].get("attempt") == b"second"


def test_a_rank_that_never_comes_is_named_after_the_timeout():
    server = start_server()  # kept referenced: the server lives as long as its object
    client = TCPStore("127.0.0.1", server.port, is_master=False, timeout=TIMEOUT)
    with pytest.raises(TimeoutError, match=r"rank 0: .* rank\(s\) \[1, 2\] did not join"):
        dist.fresh_namespace(client, 0, 3, timedelta(seconds=0.5), poll_s=0.005)
    with pytest.raises(TimeoutError, match="rank 2: .* rank 0 did not answer"):
        dist.fresh_namespace(client, 2, 3, timedelta(seconds=0.5), poll_s=0.005)
