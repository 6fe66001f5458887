"""The run layer shared by every way of running: simulation (``fedjax-fm run``) and deployment.

* :mod:`~fedjax_fm.training.experiment` -- the rounds loop of a simulated run (read it top to bottom);
* :mod:`~fedjax_fm.training.round` -- the two metered halves of a round (clients, server);
* :mod:`~fedjax_fm.training.record` -- the metrics row, totals, resume checks and
  :class:`~fedjax_fm.training.record.RunRecorder` (``metrics.jsonl``, checkpoints, ``summary.json``),
  used by the simulation and by the Flower strategy alike;
* :mod:`~fedjax_fm.training.builders` -- the pieces of a run from its config;
* :mod:`~fedjax_fm.training.checkpoint`, :mod:`~fedjax_fm.training.fingerprint`,
  :mod:`~fedjax_fm.training.progress`, :mod:`~fedjax_fm.training.compile_watch`,
  :mod:`~fedjax_fm.training.report`;
* :mod:`~fedjax_fm.training.interrupt` (SIGINT/SIGTERM: a clean stop and how to resume) and
  :mod:`~fedjax_fm.training.checks` (truncation, rejected clients, skipped rounds, unused resume changes).

Floors: this package builds on ``models``, ``fl``, ``data``, ``energy`` and ``eval``;
only ``cli`` and ``deploy`` build on it.
"""
