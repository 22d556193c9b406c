"""ordered_map: results in input order, errors where they come, at most `ahead` results held."""

import threading
import time

import pytest

from models.ordered_map import ordered_map


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_results_come_in_input_order(workers):
    def slow_for_small(i):  # early items finish last
        time.sleep(0.002 * (10 - i % 10))
        return i * i

    assert list(ordered_map(slow_for_small, range(25), workers)) == [i * i for i in range(25)]


def test_one_worker_runs_inline():
    assert list(ordered_map(lambda _: threading.current_thread(), range(3), 1)) == [threading.main_thread()] * 3


def test_several_workers_run_concurrently():
    barrier = threading.Barrier(3, timeout=10)  # passes only when three calls wait at once
    assert list(ordered_map(lambda i: barrier.wait() >= 0 and i, range(3), 3)) == [0, 1, 2]


def test_the_first_error_in_order_is_raised_after_the_results_before_it():
    def fn(i):
        if i in (3, 5):
            time.sleep(0.01 if i == 3 else 0)  # 5 fails first in time, 3 first in order
            raise ValueError(f"item {i}")
        return i

    got = []
    with pytest.raises(ValueError, match="item 3"):
        for r in ordered_map(fn, range(10), 4):
            got.append(r)
    assert got == [0, 1, 2]


def test_at_most_ahead_results_are_held():
    lock, state = threading.Lock(), {"started": 0, "yielded": 0, "most": 0}

    def fn(i):
        with lock:
            state["started"] += 1
            state["most"] = max(state["most"], state["started"] - state["yielded"])
        return i

    for i in ordered_map(fn, range(40), workers=3, ahead=5):
        time.sleep(0.001)  # the consumer is slower than the workers
        with lock:
            state["yielded"] += 1
    assert state["most"] <= 5 and state["yielded"] == 40


def test_stopping_early_starts_nothing_more():
    started = []
    results = ordered_map(lambda i: started.append(i) or i, range(1000), workers=2, ahead=4)
    assert next(results) == 0
    results.close()
    assert len(started) <= 4  # the 4 submitted before the first result


@pytest.mark.parametrize("workers,ahead,match", [(0, None, "workers=0"), (2, 0, "ahead=0")])
def test_bad_arguments(workers, ahead, match):
    with pytest.raises(ValueError, match=match):
        list(ordered_map(abs, [1], workers, ahead))
