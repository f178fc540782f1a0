"""Keep the start-up heap out of the garbage collector's full passes.

A runtime process holds a few hundred thousand long-lived objects once it has started (torch,
Triton, FastAPI, the tokenizer, the model's modules). Python's full (generation 2) collection
walks every one of them, and it runs whenever enough objects have survived the young
generations, as per-request objects do under load. Measured on the CPU with ``berth serve``
(``benchmarks/gc_pauses.py``): in the server process a full pass every ~17 s of 16 streams,
27 ms each, during which no stream gets a chunk (1.4 ms frozen); in a process that has loaded
the engine a full pass takes 135 ms (0.0 ms frozen). ``gc.freeze`` moves everything alive now
into a permanent generation that collections skip, so later full passes walk only what was
made since (vLLM does the same after start-up).
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_heap(process: str) -> int:
    """Collect once, then freeze what is left; returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("%s: %d start-up objects frozen out of the collector's full passes", process, frozen)
    return frozen
