"""The delivery's queue (``Inbox``): nothing lost or repeated between threads, no
wake-up missed, the bound kept."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, List

import pytest

from otel_zenml_analytics.inbox import CONTROL_ROOM, Inbox


def test_a_sleeping_consumer_is_woken_by_every_offer() -> None:
    # Ping-pong: the consumer is asleep at almost every offer; a missed wake-up would
    # leave it waiting until its 5 s timeout, and the item would not come back.
    inbox, back = Inbox(maxsize=1), Inbox(maxsize=1)

    def echo() -> None:
        for _ in range(2000):
            back.offer(inbox.get(5))

    thread = threading.Thread(target=echo)
    thread.start()
    for i in range(2000):
        assert inbox.offer(i)
        assert back.get(5) == i
    thread.join(10)


def test_racing_producers_lose_nothing_and_keep_their_order() -> None:
    inbox = Inbox(maxsize=64)
    received: List[Any] = []

    def consume() -> None:
        while (item := inbox.get(10)) is not None:
            received.append(item)

    def produce(producer: int) -> None:
        for i in range(5000):
            while not inbox.offer((producer, i)):
                time.sleep(0)  # full: let the consumer run

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join(30)
    inbox.put(None)
    consumer.join(30)
    assert len(received) == 4 * 5000
    for k in range(4):
        assert [i for producer, i in received if producer == k] == list(range(5000))


def test_the_bound_refuses_offers_and_control_items_past_their_room() -> None:
    inbox = Inbox(maxsize=2)
    assert inbox.offer("a") and inbox.offer("b")
    assert inbox.full() and not inbox.offer("c")
    assert all(inbox.put(f"flush {i}") for i in range(CONTROL_ROOM))  # past the bound
    assert not inbox.put("one flush too many")  # a host flushing while the consumer is stuck
    items = [inbox.get_nowait() for _ in range(len(inbox))]
    assert items == ["a", "b"] + [f"flush {i}" for i in range(CONTROL_ROOM)]
    with pytest.raises(queue.Empty):
        inbox.get_nowait()
    started = time.monotonic()
    with pytest.raises(queue.Empty):
        inbox.get(0.05)
    assert time.monotonic() - started >= 0.05
