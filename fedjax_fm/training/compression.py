"""A run's update codec (``federated.compression``): encode per client, decode before aggregation.

The codec itself is pure (:mod:`fedjax_fm.fl.codecs`); this module is what the run layer
adds around it, the same for simulation and deployment::

    outputs  = algorithm.run_clients(state, frozen, batches, ids)       deltas d_k, [K, ...]
    rng_k    = fold_in(client_rng_k, CODEC_STREAM)                       its own key per client
    payload_k, s_k' = codec.encode(d_k, s_k, rng_k)                      s_k: client k's codec state
    d̂_k     = codec.decode(payload_k)                                   what the server aggregates
    state    = algorithm.server_step(state, outputs with d̂)

* **Per-client state** (top-k's error-feedback residual) is a pytree stacked over the
  whole population, ``[N, ...]``, and indexed by client id: a client that returns after
  many rounds finds its own residual. It is checkpointed with the server state
  (:class:`CompressedRunState`), so a killed and resumed run stays bit-identical. A
  stateless codec (bf16, quantize, FFA-LoRA) adds nothing to the checkpoint, and no
  codec at all leaves the round exactly as it was (no call is made).
* A client whose delta is not finite keeps its old state and its update stays
  non-finite, so the aggregation rejects it as it would without a codec (a codec must
  not launder a NaN into a finite update, nor poison a residual for good).
* **Bytes.** ``bytes_up`` per client is the exact size of the payload
  (:func:`fedjax_fm.fl.encoded_bytes`, equal to ``tree_nbytes`` of every payload since
  the sizes depend on shapes only); the downlink is the trainable tree uncompressed.
* The encode + decode of a simulated round runs as one compiled call (vmapped over the
  round's clients), metered as its own ``codec`` section (``codec_seconds``). A device
  runs the same compiled function for its one client (:func:`encode_one`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm import fl
from fedjax_fm.energy.meter import CallRecord, Meter

# fold_in tag of the codec's random stream within a client's key: the training steps
# fold in their step index (< 2^31), so this value is never a step.
CODEC_STREAM = 0xC0DE_0001


@flax.struct.dataclass
class CompressedRunState:
    """What a run with a stateful codec checkpoints: the server state and every client's codec state."""

    server: Any
    client_codec_states: Any


def uses_ffa_lora(spec: Optional[Mapping[str, Any]]) -> bool:
    """Whether a codec spec contains ``ffa_lora`` (then the client optimiser must freeze LoRA ``A``)."""
    if not spec:
        return False
    if spec.get("name") == "ffa_lora":
        return True
    return any(uses_ffa_lora(part) for part in spec.get("codecs") or ())


def codec_rng(client_rng: jax.Array) -> jax.Array:
    """A client's codec key from its round key (``fold_in(client_rng, CODEC_STREAM)``)."""
    return jax.random.fold_in(client_rng, CODEC_STREAM)


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def roundtrip_clients(codec: fl.Codec, deltas: Any, states: Any, rngs: jax.Array) -> tuple[Any, Any, Any]:
    """Pure, over ``[K]`` stacked clients: ``(decoded, new states, payloads)``.

    ``rngs`` are the clients' *training* keys; each encode draws from :func:`codec_rng`
    of its own. A non-finite delta keeps its state and is passed on as it is.
    """

    def one(delta, state, rng):
        decoded, new_state, payload = fl.roundtrip(codec, delta, state, codec_rng(rng))
        finite = _all_finite(delta)
        decoded = jax.tree.map(lambda d, x: jnp.where(finite, d, x.astype(d.dtype)), decoded, delta)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        return decoded, new_state, payload

    return jax.vmap(one)(deltas, states, rngs)


class RunCompression:
    """The run's codec, the population's codec states, and the bytes a client moves.

    ``spec`` is ``federated.compression`` (``None``: no codec, :attr:`enabled` false and
    :meth:`apply` never called). ``trainable`` is the template of a delta; ``population``
    the number of clients whose states are kept.
    """

    def __init__(self, spec: Optional[Mapping[str, Any]], trainable: Any, population: int) -> None:
        self.spec = spec
        self.enabled = spec is not None
        self.codec = fl.make_codec(spec)
        template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), trainable)
        self.stateful = bool(jax.tree.leaves(jax.eval_shape(self.codec.init, template)))
        self.states = fl.init_client_states(self.codec, template_zeros(template), population) if self.stateful else None
        self.raw_bytes = fl.tree_nbytes(template)  # the float delta a client would send without a codec
        self.bytes_up = fl.encoded_bytes(self.codec, template)  # per client, exactly
        self.bytes_down = fl.downlink_bytes(template)  # the broadcast travels uncompressed
        codec = self.codec
        no_state = None if self.stateful else self.codec.init(template)  # a tree without leaves

        def step(states, deltas, client_ids, rngs):
            if states is None:
                decoded, _, payload = roundtrip_clients(codec, deltas, no_state, rngs)
                return decoded, None, payload
            taken = fl.take_client_states(states, client_ids)
            decoded, new, payload = roundtrip_clients(codec, deltas, taken, rngs)
            return decoded, fl.put_client_states(states, client_ids, new), payload

        self._step = jax.jit(step, donate_argnums=(0,))
        self._client_rngs = jax.jit(fl.client_rngs)

    @property
    def compression_ratio(self) -> float:
        """Float32 delta bytes over payload bytes (1.0 without a codec; 2.0 for bf16)."""
        return self.raw_bytes / self.bytes_up if self.bytes_up else float("inf")

    # -- the round -------------------------------------------------------------------

    def apply(self, outputs: fl.ClientOutputs, state: fl.ServerState, client_ids: Any,
              meter: Optional[Meter] = None) -> tuple[fl.ClientOutputs, Optional[CallRecord]]:
        """Encodes every client's delta with its own key and state, decodes them; the outputs the
        server aggregates, and the metered record of the codec call (``None`` without a meter)."""
        ids = jnp.asarray(np.asarray(client_ids), jnp.int32)
        rngs = self._client_rngs(state.rng, state.round, ids)
        if meter is None:
            decoded, self.states, payload = self._step(self.states, outputs.deltas, ids, rngs)
            record = None
        else:
            with meter.section("codec") as section:
                decoded, self.states, payload = section.block(self._step(self.states, outputs.deltas, ids, rngs))
            record = section.record
        # The sizes are static: every payload of the round has the size encoded_bytes promised.
        assert fl.tree_nbytes(payload) == self.bytes_up * ids.shape[0], "payload size differs from encoded_bytes"
        return outputs._replace(deltas=decoded), record

    def warm_up(self, outputs: fl.ClientOutputs, state: fl.ServerState, client_ids: Any) -> None:
        """Compiles the codec step (on a copy of the states: the step donates them)."""
        saved = self.states
        self.states = None if saved is None else jax.tree.map(jnp.copy, saved)
        jax.block_until_ready(self.apply(outputs, state, client_ids)[0])
        self.states = saved

    # -- checkpoints -----------------------------------------------------------------

    def checkpoint_tree(self, server_state: fl.ServerState) -> Any:
        """What to checkpoint: the server state as it is, or with the clients' codec states."""
        if not self.stateful:
            return server_state
        return CompressedRunState(server=server_state, client_codec_states=self.states)

    def restored(self, tree: Any) -> fl.ServerState:
        """The server state of a restored :meth:`checkpoint_tree` (the codec states are taken back)."""
        if not self.stateful:
            return tree
        self.states = tree.client_codec_states
        return tree.server


def compression_fields(row: dict[str, Any], compression: RunCompression, clients: int,
                       codec: Optional[CallRecord]) -> dict[str, Any]:
    """The row's codec fields: ``bytes_up_raw`` (what float32 deltas would have been),
    ``compression_ratio`` = bytes_up_raw / bytes_up, ``codec_seconds`` (encode + decode of
    the round's clients; null without a codec)."""
    row.update(
        bytes_up_raw=compression.raw_bytes * int(clients),
        compression_ratio=compression.compression_ratio,
        codec_seconds=None if codec is None else codec.wall_s,
    )
    return row


def template_zeros(template: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), template)


def encode_one(codec: fl.Codec, delta: Any, state: Any, client_rng: jax.Array) -> tuple[Any, Any]:
    """A device's encode of its own delta: ``(payload, new state)`` with the simulation's key
    (:func:`codec_rng`). Pure; jit it once."""
    return codec.encode(delta, state, codec_rng(client_rng))
