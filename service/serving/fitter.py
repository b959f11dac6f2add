"""The taught head rows (core/taught.py) kept in step with the memory, on one thread.

Every applied change to the memory calls `changed()`; `wait()` returns once the rows reflect
every change made before it was called. One fitter thread fits for everything applied so
far and wakes every waiter, so requests that arrive during a fit share the next one instead
of queueing one each (and its megabytes of temporaries come from one malloc arena).

Each fit starts from the rows as they are (warm) and runs towards the minimum; it stops after
STEP_ITERATIONS of L-BFGS-B when a request is waiting (the rows then hold its examples, near
their minimum: the request goes), a newer change arrived (the next fit takes it in), or the
last change is younger than SETTLE_SECONDS. The rest of the fit, to the minimum, runs once the
memory has been quiet that long (at once for `wait_converged()`): during a burst of feedback
each change costs its STEP_ITERATIONS and no more, instead of a fit to the minimum competing
for the cores with the next requests (in this process and in every other one applying the same
log). So a request waits for about STEP_ITERATIONS, and the rows converge to the one minimum of
the applied log (taught.py) whatever the order of the fits: two processes that applied the same
log agree to the fit's tolerance once `wait_converged()` returns in both.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from ..core.model import EnhancedClassifier
from ..core.routing import EMPTY, RoutingPolicy

log = logging.getLogger(__name__)

STEP_ITERATIONS = 25  # L-BFGS-B iterations after which a fit gives way to a waiting request or a newer change
SETTLE_SECONDS = 0.25  # a fit goes on to the minimum only once no change came for this long


class TaughtRowFitter:
    def __init__(self, model: EnhancedClassifier, policy: RoutingPolicy, lock: threading.RLock,
                 slot_feedback: torch.Tensor):
        self.model, self.policy, self.lock, self.slot_feedback = model, policy, lock, slot_feedback
        self.enabled = model.taught is not None  # a model without replay features has no rows
        self._changes = self._fitted = 0  # changes applied, and those the rows reflect
        self._converged = True  # the rows are the minimum for the changes they reflect
        self._waiting = 0  # requests in wait(): a fit gives way to them after STEP_ITERATIONS
        self._converging = 0  # callers of wait_converged(): the rest of a fit runs without settling
        self._last_change = 0.0  # time.monotonic() of the newest change
        self.steps = 0  # fits run
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def changed(self) -> None:
        """The memory changed (call under the memory lock)."""
        self._changes += 1
        self._last_change = time.monotonic()

    def wait(self) -> None:
        """Return once the rows reflect every change applied so far (near their minimum)."""
        self._wait(lambda target: self._fitted >= target, waiter="_waiting")

    def wait_converged(self) -> None:
        """Return once the rows are the minimum for every change applied so far."""
        self._wait(lambda target: self._fitted >= target and self._converged, waiter="_converging")

    def _wait(self, done, waiter: str) -> None:
        if not self.enabled:
            return
        with self._cond:
            target = self._changes
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="taught-fit", daemon=True)
                self._thread.start()
            setattr(self, waiter, getattr(self, waiter) + 1)
            self._cond.notify_all()
            try:
                while not done(target) and not self._stop.is_set():
                    self._cond.wait(1.0)
            finally:
                setattr(self, waiter, getattr(self, waiter) - 1)

    def _settling(self) -> float:
        """Seconds until the memory has been quiet for SETTLE_SECONDS (0: it has, or a caller
        waits for convergence)."""
        return 0.0 if self._converging else max(0.0, SETTLE_SECONDS - (time.monotonic() - self._last_change))

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:  # until a change to take in, or an unfinished fit whose memory settled
                while not self._stop.is_set() and self._fitted >= self._changes:
                    settling = self._settling()
                    if not self._converged and not settling:
                        break
                    self._cond.wait(settling or 1.0)
            if self._stop.is_set():
                break
            with self.lock:  # the examples as of now; the fit itself leaves predictions free to run
                target = self._changes
                taught = (self.slot_feedback != EMPTY).nonzero().squeeze(1)  # (N,) slots users taught
                examples = self.model.taught_examples(taught, self.policy)

            def give_way(iterations: int) -> bool:
                return iterations >= STEP_ITERATIONS and (self._waiting > 0 or self._changes != target
                                                          or self._settling() > 0 or self._stop.is_set())

            try:
                converged = self.model.fit_taught(examples, self.policy, warm=True, stop=give_way)
            except Exception:  # keep serving with the rows as they were; the error is in the log
                log.exception("fitting the taught head rows failed")
                converged = True  # not retried until the next change
            with self._cond:
                self._fitted, self._converged = target, converged
                self.steps += 1
                self._cond.notify_all()

    def close(self) -> None:
        """Stop, waiting for a fit in progress: a thread still inside torch when the
        interpreter exits aborts the process."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(60)
