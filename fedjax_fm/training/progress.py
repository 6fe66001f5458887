"""Live progress of a run: one line per round on stderr, plus optional TensorBoard.

A line reads::

    round  3/10 | clients 4 | loss 2.314 | eval 2.101 | ROUGE-L 18.4 | 12.6 J compute | 0.091 J comm (model) | 4.1 s/round | ETA 0:00:29

ROUGE and eval loss appear on evaluation rounds; compute joules (clients + server)
when a power backend measured them (``(est.)`` when the configured constant-power
model estimated them); communication joules always come from the network model.
The ETA is the mean wall time of the rounds run *in this process* times the rounds
left (rounds restored from a checkpoint do not count, their time is not known).
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any, Optional, TextIO


def _format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


class ProgressPrinter:
    """Prints one line per round to ``stream`` (stderr by default)."""

    def __init__(self, total_rounds: int, *, stream: Optional[TextIO] = None, enabled: bool = True,
                 energy_is_estimate: bool = False) -> None:
        self.total_rounds = total_rounds
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.energy_is_estimate = energy_is_estimate
        self._round_seconds: list[float] = []
        self._last = time.perf_counter()

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def start_round(self) -> None:
        self._last = time.perf_counter()

    def round_done(self, row: dict[str, Any]) -> None:
        now = time.perf_counter()
        if row["round"] > 0:
            self._round_seconds.append(now - self._last)
        self._last = now
        if not self.enabled:
            return
        width = len(str(self.total_rounds))
        parts = [f"round {row['round']:>{width}}/{self.total_rounds}", f"clients {row.get('clients') or 0}"]
        if row.get("train_loss") is not None:
            parts.append(f"loss {row['train_loss']:.3f}")
        if row.get("eval_loss") is not None:
            parts.append(f"eval {row['eval_loss']:.3f}")
        if row.get("rougeL") is not None:
            parts.append(f"ROUGE-L {row['rougeL']:.1f}")
        compute = [row.get(k) for k in ("client_joules", "server_joules")]
        if all(j is not None for j in compute):
            parts.append(f"{sum(compute):.1f} J compute" + (" (est.)" if self.energy_is_estimate else ""))
        if row.get("comm_joules") is not None:
            parts.append(f"{row['comm_joules']:.2g} J comm (model)")
        if self._round_seconds:
            mean = sum(self._round_seconds) / len(self._round_seconds)
            parts.append(f"{mean:.1f} s/round")
            parts.append(f"ETA {_format_eta(mean * max(self.total_rounds - row['round'], 0))}")
        print(" | ".join(parts), file=self.stream, flush=True)


class TensorBoardWriter:
    """Scalars per round to TensorBoard, if ``tensorboardX`` is installed.

    Without it the writer is disabled and says so once (TensorBoard is an option,
    not a dependency: ``pip install tensorboardX``).
    """

    def __init__(self, log_dir: str, *, enabled: bool, say=print) -> None:
        self._writer = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            say("output.tensorboard is on but tensorboardX is not installed; skipping TensorBoard "
                "(pip install tensorboardX)")
            return
        self._writer = SummaryWriter(log_dir)

    def write(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            return
        for key, value in row.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, row["round"])
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
