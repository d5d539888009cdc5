"""What never becomes garbage is kept out of the garbage collector's way.

CPython's cyclic collector rescans every tracked object at each full (generation 2) collection.
A server process holds about 95,000 of them from its imports alone (modules, pydantic and
SQLAlchemy schemas, the message registry) and a node agent about 60,000; none of them is ever
garbage. In the fanout at 1,000 agents the full collections came every few batches of a change to
all, 108-280 ms each and always in the middle of a batch (its p99 260-300 ms against a p50 of
150). In an agent the same pause stalls the packet thread. Frozen (``gc.freeze``), those objects
are left out of every later collection; whatever is created afterwards is collected as before.

Only once, at startup, and only after a full collection. Freezing the fanout's heap again every
5 s (so that its 10,000 views would leave the scans too) halved its collection pauses at 10,000
nodes, but a freeze cannot tell garbage from the living: cycles that died after being frozen
stayed allocated until a full collection, and a burst of 1,000 changes among 1,000 agents then
committed in 12-21 s instead of 4.5-6.1 s. It was reverted.
"""

from __future__ import annotations

import gc
import logging

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
