"""Ctrl-C and ``kill``: a run that ends cleanly and says how to continue.

``fedjax-fm run`` installs :class:`GracefulStop` for SIGINT and SIGTERM:

* during a training round (from its client phase to its checkpoint) the first signal
  lets the round **finish**: its row is written to ``metrics.jsonl`` and the state is
  checkpointed (even off the ``checkpoint.every`` interval), so ``--resume`` loses
  nothing; then the run stops;
* anywhere else (set-up, compilation, the evaluation before training), or at a second
  signal, the work in flight is **abandoned** at once: :class:`RunInterrupted` is raised.
  ``metrics.jsonl`` then holds whole rows only (each row is one write), and
  ``--resume`` continues from the newest checkpoint, retraining the rounds after it
  bit-identically.

Either way the command prints one line saying what happened and the command that
continues the run, and exits with ``128 + signal``: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import shlex
import signal
from typing import Any, Optional, Sequence

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """The run stopped at a signal; ``finished`` says whether the round in flight was completed."""

    def __init__(self, signum: int, finished: bool = False, round_: Optional[int] = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.finished = finished
        self.round = round_

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop:
    """Context manager: turns SIGINT/SIGTERM into a deferred stop inside a round, an immediate one outside."""

    def __init__(self) -> None:
        self.requested: Optional[int] = None
        self.deferring = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.deferring and self.requested is None:
            self.requested = signum
            return
        raise RunInterrupted(self.requested or signum)

    def __enter__(self) -> "GracefulStop":
        for signum in _SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def resume_command(config: str, out: str, overrides: Sequence[str] = ()) -> str:
    """The shell command that continues a run."""
    parts = ["fedjax-fm", "run", config, "--out", out]
    for override in overrides:
        parts += ["--set", override]
    return " ".join(shlex.quote(p) for p in parts + ["--resume"])


def interrupted_message(error: RunInterrupted, *, rounds: int, last_checkpoint: Optional[int],
                        checkpoints_enabled: bool, command: str) -> str:
    """The one line printed when a run stops at a signal."""
    name = signal.Signals(error.signum).name
    if error.finished:
        what = f"round {error.round}/{rounds} was finished" + (" and checkpointed" if checkpoints_enabled else "")
    elif error.round is not None:
        what = f"round {error.round}/{rounds} in flight was abandoned"
    else:
        what = "no round was in flight"
    if not checkpoints_enabled:
        where = "checkpoints are off (checkpoint.enabled: false), so --resume starts again from round 0"
    elif last_checkpoint is None:
        where = "no checkpoint yet, so --resume starts from round 0"
    else:
        where = f"--resume continues from the checkpoint of round {last_checkpoint}"
    return f"fedjax-fm run: interrupted by {name}: {what}; {where}: {command}"
