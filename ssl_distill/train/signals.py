"""Stop signals -> a checkpoint of the current iteration, then a clean stop.

``SIGTERM`` (``timeout``, Kubernetes, schedulers, ``kill``), ``SIGINT`` (Ctrl-C) and Slurm's ``USR2`` (preemption,
time limit) all take one path: the handler calls :meth:`~ssl_distill.train.trainer.Trainer.request_stop`, the ranks
agree at the next iteration boundary, the iteration in progress finishes, a checkpoint of it is written, and the
trainer raises :class:`~ssl_distill.train.trainer.TrainingInterrupted`. At most that iteration's work is lost.
A second Ctrl-C while this happens raises ``KeyboardInterrupt`` at once (no checkpoint; the previous one stays).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)


class StopOnSignals:
    """Install handlers for ``signums`` that stop an attached trainer gracefully (see the module docstring).

    ``received``: the first stop signal seen (None so far). ``previous``: the handlers that were installed before,
    put back by :meth:`restore`. Outside the main thread (where Python allows no handlers) this does nothing.
    """

    def __init__(self, signums: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.received: int | None = None
        self.trainer: Any = None
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in signums:
            self.previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop waiting for the checkpoint
            return
        self.received = signum
        hint = " (Ctrl-C again to exit at once, without it)" if signal.SIGINT in self.previous else ""
        logger.warning("received %s: finishing the current iteration and saving a checkpoint%s",
                       signal.Signals(signum).name, hint)
        if self.trainer is not None:
            self.trainer.request_stop(self.signal_name)

    def attach(self, trainer: Any) -> None:
        """Stop ``trainer`` on a signal (one that arrived while it was being built stops it at once)."""
        self.trainer = trainer
        if self.received is not None:
            trainer.request_stop(self.signal_name)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""
