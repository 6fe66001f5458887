"""Multi-process simulation on ``jax.distributed``: ``fl.Sharded`` over two local CPU processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fedjax_fm import fl

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import distributed_worker as worker  # noqa: E402

TIMEOUT_S = 600  # only stops a real hang


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def launch(args_for: list[list[str]], env: dict[str, str], logs: Path) -> list[subprocess.CompletedProcess]:
    """Starts every command at once, output to files (a full pipe would block a process mid-collective)."""
    files = [open(logs / f"p{i}.log", "w+") for i in range(len(args_for))]
    procs = [subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
             for args, f in zip(args_for, files)]
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass  # a hang: killed below (returncode -9); the logs, with the workers' stack dumps, say where
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, f in zip(procs, files):
        f.seek(0)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, f.read()))
        f.close()
    return results


def test_client_slots_pad_globally_and_cover_every_client():
    assert jax.device_count() == 4, "tests/conftest.py sets 4 virtual CPU devices"
    slots = fl.Sharded().client_slots(7)
    assert (slots.group, slots.padded) == (8, 8)
    np.testing.assert_array_equal(slots.positions, np.arange(8))
    np.testing.assert_array_equal(slots.sources, [0, 1, 2, 3, 4, 5, 6, 0])
    assert slots.real.tolist() == [True] * 7 + [False]
    groups = fl.Sharded(clients_per_device=1).client_slots(5)
    assert (groups.group, groups.padded) == (4, 8)
    assert fl.client_slots(fl.Vmapped(), 5).positions.tolist() == [0, 1, 2, 3, 4]


def test_sharded_places_once_and_keeps_placed_trees():
    executor = fl.Sharded()
    tree = {"w": np.ones((3, 2), np.float32), "b": jax.numpy.zeros([2])}
    placed = executor.place(tree)
    again = executor.place(placed)
    assert all(a is b for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(again)))
    assert len(placed["w"].sharding.device_set) == 4


def test_sharded_takes_this_process_slots_as_batches():
    """The local form (slots.sources, padding included) equals the whole-round form."""
    update, trainable, frozen, vocab = worker.setup()
    executor = fl.Sharded()
    algorithm = fl.FederatedAlgorithm(update, fl.fedyogi(learning_rate=1e-3), executor=executor)
    state = algorithm.init(trainable, 0)
    ids = fl.sample_clients(0, 0, worker.POPULATION, 7)
    whole = algorithm.run_clients(state, frozen, worker.client_batches(ids, 0, vocab), ids)
    slots = executor.client_slots(7)
    local = algorithm.run_clients(state, frozen, worker.client_batches(ids[slots.sources], 0, vocab), ids)
    for a, b in zip(jax.tree.leaves(fl.to_host(whole)), jax.tree.leaves(fl.to_host(local))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="slots"):
        algorithm.run_clients(state, frozen, worker.client_batches(ids[:5], 0, vocab), ids)


def test_two_processes_equal_sequential(tmp_path):
    """Two CPU processes (2 devices each) on 127.0.0.1: LoRA T5, dropout, FedYogi, 2 rounds."""
    port = free_port()
    outs = [tmp_path / f"p{i}.npz" for i in range(2)]
    results = launch([[sys.executable, str(HERE / "distributed_worker.py"), str(port), str(i), str(outs[i])]
                      for i in range(2)], two_process_env(), tmp_path)
    for i, result in enumerate(results):
        assert result.returncode == 0, f"process {i} failed:\n{result.stdout[-4000:]}"
    p0, p1 = (dict(np.load(out)) for out in outs)
    for name, (clients, _) in worker.SETTINGS.items():
        # each process fed its own half of the slots
        assert p0[f"{name}/slots"].tolist() != p1[f"{name}/slots"].tolist()
        params, losses = worker.run(fl.Sequential(), clients)
        leaves = jax.tree.leaves(params)
        assert leaves, "no parameters"
        for i, expected in enumerate(leaves):
            np.testing.assert_array_equal(p0[f"{name}/{i}"], p1[f"{name}/{i}"])  # identical on both
            np.testing.assert_allclose(p0[f"{name}/{i}"], np.asarray(expected), atol=1e-6, rtol=0)
        np.testing.assert_allclose(p0[f"{name}/loss"], losses, atol=1e-5)
        assert p0[f"{name}/loss"].shape == (clients,)
