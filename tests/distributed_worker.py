"""One process of the two-process ``Sharded`` test (tests/test_distributed.py launches two).

    python tests/distributed_worker.py PORT PROCESS_ID OUT.npz

Joins a 2-process ``jax.distributed`` run on 127.0.0.1:PORT (two forced CPU devices
each: a 4-device global mesh), trains a tiny LoRA T5 with dropout and FedYogi for
two rounds with :class:`fl.Sharded`, and saves the final adapters (``to_host``) to
OUT.npz. Each process builds only the batches of the clients its devices hold
(``executor.client_slots``). Two settings: 8 clients in one call, and 7 clients in
groups of 4 (``clients_per_device=1``: two calls, one padding slot).

:func:`setup` and :func:`client_batches` are shared with the test's single-process
``Sequential`` reference.
"""

from __future__ import annotations

import sys

import numpy as np

ROUNDS, POPULATION, STEPS, BATCH, SRC, TGT = 2, 10, 2, 2, 8, 6
SETTINGS = {"eight": (8, None), "seven_groups": (7, 1)}  # name: (clients per round, clients_per_device)


def setup():
    """``(client_update, trainable, frozen)`` of the tiny LoRA T5, with dropout in the model and adapters."""
    import jax
    import optax

    from fedjax_fm import fl
    from fedjax_fm.fl.t5_task import t5_loss_fn, t5_partition
    from fedjax_fm.models import LoraConfig, T5, init_params, preset

    config = preset("tiny", num_layers=1, num_decoder_layers=1, dropout_rate=0.1)
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.1, target_modules=("q", "v"))
    params = init_params(config, jax.random.PRNGKey(0))
    trainable, frozen = t5_partition(params, lora, jax.random.PRNGKey(1))
    # Small learning rates: Adam-type steps at both ends amplify float reassociation (vmap vs one
    # call per client) into the last digits; at 1e-2 even one-process Vmapped differs by ~1e-5.
    update = fl.make_client_update(t5_loss_fn(T5(config, lora=lora)), optax.adamw(1e-3))
    return update, trainable, frozen, config.vocab_size


def client_batches(client_ids, round_index, vocab_size):
    """``[len(client_ids), steps, batch, ...]`` batches, each client's a pure function of (client, round)."""
    per_client = []
    for client in client_ids:
        rng = np.random.default_rng([int(client), round_index])
        shape = (STEPS, BATCH)
        src_len = rng.integers(3, SRC + 1, size=shape)
        attention_mask = (np.arange(SRC) < src_len[..., None]).astype(np.int32)
        input_ids = rng.integers(2, vocab_size, size=shape + (SRC,)).astype(np.int32) * attention_mask
        tgt_len = rng.integers(2, TGT + 1, size=shape)
        decoder_attention_mask = (np.arange(TGT) < tgt_len[..., None]).astype(np.int32)
        labels = rng.integers(2, vocab_size, size=shape + (TGT,)).astype(np.int32) * decoder_attention_mask
        decoder_input_ids = np.concatenate([np.zeros(shape + (1,), np.int32), labels[..., :-1]], axis=-1)
        weight = np.ones(shape, np.float32)
        if int(client) % 3 == 0:
            weight[-1, -1] = 0.0  # a padding example now and then
        per_client.append({
            "input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
            "labels": labels, "decoder_attention_mask": decoder_attention_mask, "example_weight": weight,
        })
    return {k: np.stack([c[k] for c in per_client]) for k in per_client[0]}


def run(executor, clients_per_round, seed=0):
    """Two rounds; returns the final trainable parameters and the last round's client losses on the host."""
    from fedjax_fm import fl

    update, trainable, frozen, vocab = setup()
    algorithm = fl.FederatedAlgorithm(update, fl.fedyogi(learning_rate=1e-3), executor=executor)
    state = algorithm.init(trainable, seed)
    frozen = executor.place(frozen)  # placed once, kept across rounds
    for r in range(ROUNDS):
        ids = fl.sample_clients(seed, r, POPULATION, clients_per_round)
        slots = fl.client_slots(executor, len(ids))
        batches = client_batches(ids[slots.sources], r, vocab)  # only this process's clients
        state, metrics = algorithm.round(state, frozen, batches, ids)
    return fl.to_host(state.params), fl.to_host(metrics["client_loss"])


def main(port: int, process_id: int, out: str) -> None:
    import faulthandler

    import jax

    # Should a collective ever wait forever, the test's log shows where (Python stacks of all threads).
    faulthandler.dump_traceback_later(180, exit=False)

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=120, heartbeat_timeout_seconds=30)
    jax.config.update("jax_default_matmul_precision", "highest")
    from fedjax_fm import fl

    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    saved = {}
    for name, (clients, per_device) in SETTINGS.items():
        executor = fl.Sharded(clients_per_device=per_device)
        assert executor.multi_process
        params, losses = run(executor, clients)
        saved.update({f"{name}/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))})
        saved[f"{name}/loss"] = np.asarray(losses)
        saved[f"{name}/slots"] = fl.client_slots(executor, clients).positions
    np.savez(out, **saved)
    faulthandler.cancel_dump_traceback_later()
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
