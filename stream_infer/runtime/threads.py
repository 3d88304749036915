"""The worker's threads, and how work crosses between them and the event loop.

One event loop runs faust (agents, timers, web pages) and never blocks. Everything that does
runs on a thread of its own::

    consumer thread (io/source)     --hand_off-->  event loop: the serve agent
      serve agent   --> inference thread: decode, route, infer, produce (batches in order)
      publisher's threads: delivery reports complete the batch's Ticket
      commit task (event loop): awaits each Ticket, in order, then the offsets are stored
    control-log thread (io/control_log) --hand_off-->  event loop: the obey agent
      obey agent    --> loader thread: apply the command, load and warm up what it routes
                    --> a barrier on the inference thread (batches served by the old routing
                        are done) --> the ack, published from the loader thread
    learning thread (runtime/learning): fed by the inference thread through a bounded queue

A thread other than the event loop's never touches an asyncio object: it hands an item over
with a bridge (:meth:`Threads.bridge`) that schedules the put on the loop. The inference and
loader threads are one thread each, so batches, and commands and loads, keep their order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Threads:
    """The inference thread, the model-loader thread and the bridges into the event loop."""

    def __init__(self, initializer: Callable[[], None] | None = None) -> None:
        """``initializer`` runs first on each of these threads: the worker sets the thread's
        torch intra-op thread count there (:func:`torch_threads`)."""
        self.inference = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="inference", initializer=initializer
        )
        # Models load here, beside serving, never on the inference thread.
        self.loader = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="model-loader", initializer=initializer
        )

    @staticmethod
    def bridge(put: Callable[[T], Coroutine[Any, Any, object]]) -> Callable[[T], None]:
        """A hand-off for another thread (the consumer's, the control log's): each item it is
        given is put, with ``put``, on the event loop this is called on."""
        loop = asyncio.get_running_loop()

        def hand_off(item: T) -> None:
            asyncio.run_coroutine_threadsafe(put(item), loop)

        return hand_off

    async def on_inference(self, work: Callable[[], R]) -> R:
        """Run ``work`` on the inference thread, after every batch queued there before it."""
        return await asyncio.get_running_loop().run_in_executor(self.inference, work)

    async def on_loader(self, work: Callable[[], R]) -> R:
        """Run ``work`` on the loader thread, after every command and load queued before it."""
        return await asyncio.get_running_loop().run_in_executor(self.loader, work)

    def later_on_loader(self, work: Callable[[], object]) -> bool:
        """Queue ``work`` on the loader thread without waiting for it; False when the loader is
        shut down (the worker is stopping)."""
        try:
            asyncio.get_running_loop().run_in_executor(self.loader, work)
        except RuntimeError:
            return False
        return True

    async def inference_barrier(self) -> None:
        """Return once every batch queued on the inference thread before this call is done."""
        await self.on_inference(_barrier)


def _barrier() -> None:
    """Runs on the inference thread after every batch queued before it."""


def torch_threads(n: int) -> Callable[[], None]:
    """An initializer that sets the calling thread's torch intra-op thread count to ``n``.

    torch's OpenMP pool size is per calling thread, set lazily at the thread's first op from
    the process-wide value of that moment: ``torch.set_num_threads`` on one thread left the
    model-call thread, which runs every forward pass, at OpenMP's default (one per core), and
    an idle OpenMP worker spins at its barrier between batches. Found with
    py-spy and gdb at saturation (issue 16): a libgomp thread in ``gomp_barrier_wait_end``
    burnt 33-42 % of a core beside the model-call thread's 15-19 %; OMP_NUM_THREADS=1 took the
    worker from 0.039 to 0.018 CPU s per 1k events. So every thread that runs torch sets it."""

    def initialize() -> None:
        import torch  # the runtime imports torch anyway; kept out of this module's import

        try:
            # torch initializes a thread's OpenMP count lazily, at its first op, from the
            # process-wide value of that moment (whatever thread set it last): trigger that
            # first, then set this thread's own, which sticks.
            torch.get_num_threads()
            torch.set_num_threads(n)
        except Exception:  # a performance setting: never a broken executor over it
            log.exception("torch.set_num_threads(%d) failed", n)

    return initialize
