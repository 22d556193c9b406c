"""``fn`` over a sequence on a few threads, results in order: the per-tensor work of loading.

Loading a checkpoint is a loop of independent per-tensor steps (read the mapped file, cast,
check finiteness, quantize) whose torch ops release the GIL, followed by an assignment into the
model that must stay on one thread and in order. `ordered_map` runs the steps ``workers`` at a time
and yields their results in input order, holding at most ``ahead`` finished or running results, so
a model never sits twice in memory. An exception is raised where its item comes in the order,
after the results before it; the items not yet started are then cancelled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int | None = None) -> Iterator[R]:
    """``fn(item)`` for each item, in input order; ``workers`` threads (1: inline, no thread), at
    most ``ahead`` (default ``2 * workers``) results submitted and not yet yielded."""
    if workers < 1:
        raise ValueError(f"workers={workers}: expected at least 1")
    if workers == 1:
        yield from map(fn, items)
        return
    ahead = 2 * workers if ahead is None else ahead
    if ahead < 1:
        raise ValueError(f"ahead={ahead}: expected at least 1")
    pending: deque[Future[R]] = deque()
    source = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="load") as pool:
        try:
            for item in source:
                pending.append(pool.submit(fn, item))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error, or the caller stopped early: start nothing more
            for future in pending:
                future.cancel()
