"""What never becomes garbage is kept out of the garbage collector's way.

CPython's cyclic collector rescans every tracked object at each full (generation 2) collection.
A server process holds about 95,000 of them from its imports alone (modules, pydantic and
SQLAlchemy schemas, the message registry) and a node agent about as many; none of them is ever
garbage. In the fanout at 1,000 agents the full collections came every few batches of a change to
all, 108-280 ms each and always in the middle of a batch (its p99 260-300 ms against a p50 of
150). In an agent the same pause stalls the packet thread. Frozen (``gc.freeze``), those objects
are left out of every later collection; whatever is created afterwards is collected as before.

The fanout also keeps a view per connected node, and at 10,000 nodes those alone made every full
collection 300-620 ms (16 of them, 4.6 s in all, while the nodes connected and four changes to all
went out). It freezes again at intervals (:class:`Refreezer`), so that what it built since leaves
the scans too. Freezing costs nothing (the generations are spliced onto the frozen list), but it
does not tell garbage from the living: a cycle already unreachable at that moment stays allocated
until the next full collection. The fanout's cyclic garbage is tens of objects between two full
collections; the refreezer runs one full collection an hour to give it back.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_long_lived() -> int:
    """Collect what is garbage now, then freeze everything still alive; returns how many are frozen.

    Call it once the process has built what it keeps for its lifetime (imports, configuration,
    the service object). The collection first matters: cyclic garbage frozen would never be freed.
    A frozen object that dies later is still freed by its reference count.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("%d long-lived objects left out of garbage collection", frozen)
    return frozen


FREEZE_EVERY = 5.0  # seconds between two freezes of what was built since (O(1) each)
COLLECT_EVERY = 3600.0  # seconds between full collections over everything, frozen or not


class Refreezer:
    """Freezes a long-running process's heap every FREEZE_EVERY and collects all of it every COLLECT_EVERY.

    Call :meth:`tick` from the process's own periodic work, between batches: the full collection
    pauses the process (about a second at 10,000 nodes in the fanout), once an hour.
    """

    def __init__(self, now: float, freeze_every: float = FREEZE_EVERY, collect_every: float = COLLECT_EVERY) -> None:
        self.freeze_every = freeze_every
        self.collect_every = collect_every
        self._next_freeze = now + freeze_every
        self._next_collect = now + collect_every

    def tick(self, now: float) -> None:
        if now >= self._next_collect:
            self._next_collect = now + self.collect_every
            self._next_freeze = now + self.freeze_every
            started = time.monotonic()
            gc.unfreeze()
            collected = gc.collect()
            gc.freeze()
            log.info(
                "full collection: %d unreachable objects freed in %.0f ms; %d frozen",
                collected,
                (time.monotonic() - started) * 1000,
                gc.get_freeze_count(),
            )
        elif now >= self._next_freeze:
            self._next_freeze = now + self.freeze_every
            gc.freeze()
