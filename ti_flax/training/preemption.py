"""Turning SIGTERM / SIGINT into "finish this step, checkpoint, stop" instead of a dead process."""

import signal
import threading

from ..errors import UserError


class Preempted(UserError):
    """Training stopped on a signal after saving a checkpoint; exits with 128 + the signal."""

    label = "stopped"

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopOnSignal:
    """Context manager: while active, SIGTERM and SIGINT only set `requested` (the signal
    number); the loop checks it after each step. Further signals while a checkpoint is being
    saved are recorded too, never raised, so they cannot interrupt the save."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = 0
        self._previous = {}

    def _handle(self, signum, frame):
        if not self.requested:
            print(f"\nreceived {signal.Signals(signum).name}: finishing this step and saving a checkpoint", flush=True)
        self.requested = self.requested or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only work there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
