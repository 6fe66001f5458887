"""Fault drills for the loopback deployment tests: fedjax-fm's ClientApp, with devices that fail.

A SuperNode started with one of these environment variables (its ClientApp processes
inherit them) fails in round ``t`` (1-based) of the run:

* ``FEDJAX_FM_DRILL_CRASH_AT_ROUND=t`` -- SIGKILLs the device's process group inside
  the round's local training: the whole device (SuperNode, SuperExec and ClientApp)
  when ``flower-supernode`` leads its group (``setsid``);
* ``FEDJAX_FM_DRILL_HANG_AT_ROUND=t`` -- blocks the round's training forever (alive and
  heartbeating: the server's ``--round-timeout`` must give up on it);
* ``FEDJAX_FM_DRILL_NAN_AT_ROUND=t`` -- returns a NaN delta.

Test code only: the production client (``fedjax_fm.deploy.client``) reads no such variable.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from fedjax_fm.deploy.apps import NodeClient, make_client_app
from fedjax_fm.deploy.client import DeviceClient

CRASH_ENV = "FEDJAX_FM_DRILL_CRASH_AT_ROUND"
HANG_ENV = "FEDJAX_FM_DRILL_HANG_AT_ROUND"
NAN_ENV = "FEDJAX_FM_DRILL_NAN_AT_ROUND"


def _drill_round(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


class DrillDeviceClient(DeviceClient):
    """fedjax-fm's device, failing as its SuperNode's environment says (module docstring)."""

    def train(self, trainable: Any, batches: dict, rng: Any, round_index: int):
        if _drill_round(CRASH_ENV) == round_index + 1:
            self.log(f"device {self.client_id}: fault drill, killing process group {os.getpgrp()}")
            os.killpg(os.getpgrp(), signal.SIGKILL)
        if _drill_round(HANG_ENV) == round_index + 1:
            self.log(f"device {self.client_id}: fault drill, hanging in round {round_index + 1}")
            while True:
                time.sleep(3600)
        delta, host, record = super().train(trainable, batches, rng, round_index)
        if _drill_round(NAN_ENV) == round_index + 1:
            delta = jax.tree.map(lambda x: np.full(np.shape(x), np.nan, np.asarray(x).dtype), delta)
        return delta, host, record


class DrillNodeClient(NodeClient):
    def device_client(self, cfg: Any) -> DeviceClient:
        return DrillDeviceClient(cfg, self.data_dir, self.client_id, log=lambda m: print(m, file=sys.stderr, flush=True))


client_app = make_client_app(DrillNodeClient)
