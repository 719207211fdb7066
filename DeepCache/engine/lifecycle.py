"""Ownership and lifecycle: leases, installing and removing patches, the evaluation guard, running generations.

See ``docs/design.md`` for why each lock and shared variable exists and who may wait for whom.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .state import Generation

if TYPE_CHECKING:
    from .unet.controlnet import ControlNetPatch
    from .unet.patch import UNetPatch


class DeepCacheWarning(UserWarning):
    """DeepCache runs a module uncached, or in full, where the user may expect caching."""


# -- the install lock ---------------------------------------------------------------------------------
# One lock for installing and removing patches (and for their owner sets and running counters). A weakref
# callback (a helper collected while enabled) may fire in any thread at any allocation, also in the thread that
# holds the lock, so it never waits for it: it queues its release, and whoever holds the lock runs the queue
# after letting go.
_LOCK = threading.Lock()
_QUEUE: deque[Callable[[], None]] = deque()


def _drain() -> None:
    while _QUEUE:
        if not _LOCK.acquire(blocking=False):
            return  # the holder drains when it lets go
        try:
            while _QUEUE:
                _QUEUE.popleft()()
        finally:
            _LOCK.release()


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Hold the install lock; run the queued releases afterwards (also when the body raised)."""
    try:
        with _LOCK:
            yield
    finally:
        _drain()


# -- the evaluation guard --------------------------------------------------------------------------------
class EvaluationGuard:
    """One evaluation of a patched module at a time, across threads: what keeps the patch's mode attributes,
    which the wrappers read and compiled graphs guard on, consistent with the evaluation that reads them.

    Taken and released by the root wrapper of the module (:func:`DeepCache.engine.wrappers.evaluate`) in a
    ``try``/``finally``, so whatever is raised inside the evaluation (``KeyboardInterrupt`` too) releases it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    def enter(self) -> bool:
        """Take the guard for this thread's evaluation. False if this thread already holds it (a nested
        evaluation: it runs within the outer one, which releases)."""
        me = threading.get_ident()
        if self._owner == me:
            return False
        self._lock.acquire()
        self._owner = me
        return True

    def leave(self) -> None:
        self._owner = None
        self._lock.release()

    def mine(self) -> bool:
        """Whether the evaluation in progress is this thread's. Another thread's evaluation can reach a wrapped
        module without having entered (it entered the module before the patch was installed): it runs plain."""
        return self._owner == threading.get_ident()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the guard (unless this thread's own evaluation holds it) while the wrappers come off, so they
        never come off in the middle of another thread's evaluation."""
        took = self.enter()
        try:
            yield
        finally:
            if took:
                self.leave()


# -- running generations ----------------------------------------------------------------------------------
# the generations opened by pipeline calls in this context (thread / task), innermost last
_GENERATIONS: contextvars.ContextVar[tuple[Generation, ...]] = contextvars.ContextVar("deepcache_generations", default=())


def generations() -> tuple[Generation, ...]:
    """The generations opened in the current context, innermost last."""
    return _GENERATIONS.get()


@contextlib.contextmanager
def running(gen: Generation) -> Iterator[Generation]:
    """Make ``gen`` the generation of its U-Net for the evaluations run in this context, then free it."""
    patch = gen.owner
    patch.generation_started()
    try:
        token = _GENERATIONS.set(_GENERATIONS.get() + (gen,))
        try:
            yield gen
        finally:
            _GENERATIONS.reset(token)
            gen.release()
    finally:
        patch.generation_ended()


@contextlib.contextmanager
def running_call(lease: "Lease", params: Any,
                 num_steps: Callable[[], int | None] = lambda: None) -> Iterator[list[Any]]:
    """One pipeline call's generations of ``params``: one on the lease's denoiser, then one on each of its
    :attr:`Lease.extras` (Wan 2.2's ``transformer_2``), all :func:`running` in this context and freed afterwards.

    The generations of a call know each other (``siblings``): a CFG branch that starts on ``transformer_2`` goes on
    counting the steps ``transformer`` ran for it, with a cache of its own (so its first step there is a full step).
    The helper's pipeline calls, the calibration replay and the closed-loop runs all open their generations here.
    """
    gens = [lease.unet_patch.new_generation(params, num_steps)]
    gens += [extra.unet_patch.new_generation(params, num_steps) for extra in lease.extras]
    if len(gens) > 1:  # extras exist only for transformers: their generations count steps per branch together
        for g in gens:
            g.siblings = [x for x in gens if x is not g]
    with contextlib.ExitStack() as stack:
        for g in gens:
            stack.enter_context(running(g))
        yield gens


# -- leases -----------------------------------------------------------------------------------------------
class Lease:
    """An enabled helper's hold on a U-Net patch (and on the ControlNet patches of its pipeline).

    The helper keeps it; the patches keep only weak references. :meth:`release` lets go; so does dropping
    the lease (a helper garbage-collected while enabled), so a dead helper never keeps a U-Net patched.
    """

    def __init__(self, unet_patch: "UNetPatch") -> None:
        self.unet_patch = unet_patch
        self.controlnets: list["ControlNetPatch"] = []
        self.bare: Generation | None = None  # the running generation of a bare-U-Net helper
        self.extras: list[Lease] = []  # the pipeline's other denoisers (Wan 2.2's transformer_2), released with it
        self.released = False
        self.ref = weakref.ref(self, _lease_collected(unet_patch))

    def release(self) -> None:
        with locked():
            if not self.released:
                self.released = True
                let_go(self.ref, self.unet_patch, self.controlnets)
                self.bare = None
        for extra in self.extras:
            extra.release()


def _lease_collected(unet_patch: "UNetPatch") -> Callable[[weakref.ref], None]:
    patch_ref = weakref.ref(unet_patch)

    def collected(ref: weakref.ref) -> None:
        def release() -> None:
            patch = patch_ref()
            if patch is not None:
                let_go(ref, patch, [cn for cn in patch.controlnet_patches() if ref in cn.owners])

        _QUEUE.append(release)
        _drain()

    return collected


def let_go(ref: weakref.ref, unet_patch: "UNetPatch", controlnets: list["ControlNetPatch"]) -> None:
    """(Install lock held.) Remove one owner; patches that lose their last owner come off once no generation
    runs on the U-Net."""
    for cn in controlnets:
        cn.owners.pop(ref, None)
        if not cn.owners:
            unet_patch.when_idle(cn.remove)
    unet_patch.owners.pop(ref, None)
    if not unet_patch.owners:
        unet_patch.when_idle(unet_patch.remove)


def current_lease_generation(owners: dict[weakref.ref, None]) -> Generation | None:
    """The running generation of the newest enabled bare-U-Net helper among ``owners``, if any."""
    for ref in reversed(list(owners)):
        lease = ref()
        if lease is not None and lease.bare is not None:
            return lease.bare
    return None


def caller_self(skip: tuple[str, ...], depth: int = 16) -> Any:
    """``self`` of the first frame above the caller that is not call machinery (code in a file under one of
    ``skip``), or None. Reads the locals of that one frame only."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        if not frame.f_code.co_filename.startswith(skip):
            return frame.f_locals.get("self")
        frame = frame.f_back
    return None
