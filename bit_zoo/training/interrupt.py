"""A stop request from SIGTERM or SIGINT, honoured between optimizer steps.

Preemption on a shared cluster or a cloud platform sends SIGTERM first (and SIGKILL a grace period
later); Ctrl-C sends SIGINT. The first one sets a flag that the training loop reads after each step:
it saves a resumable checkpoint and stops. The handler also restores the default action, so a
second signal ends the process at once, even inside a compiled step or an evaluation.

    with StopSignals() as stop:
        for ...:
            step()
            if stop.requested:
                save(); raise TrainingInterrupted(...)
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["StopSignals"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Catch SIGTERM/SIGINT while the block runs (installed from the main thread only; elsewhere it
    never fires). ``signum`` is the first signal received, None until then."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - the signal module's signature
        if self.signum is None:
            self.signum = signum
        for s in SIGNALS:  # the next one takes the default action: the process ends at once, nothing saved
            signal.signal(s, signal.SIG_DFL)
        name = signal.Signals(signum).name
        # os.write: a handler may run while the logging machinery is mid-record
        os.write(2, f"\n{name} received: stopping after this step with a checkpoint (send it again to stop at once, unsaved)\n".encode())

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def rearm(self) -> None:
        """Install the handler again (until a signal came). MindSpore's graph executor puts its own SIGINT
        handler in place for every run of a compiled graph, and that one raises SIGTERM instead: a Ctrl-C
        during a step arrives here as SIGTERM, and without this, one between steps would too."""
        if self._previous and self.signum is None:
            for s in SIGNALS:
                signal.signal(s, self._handle)

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
