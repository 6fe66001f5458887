"""Pytrees on the wire: Flower ``Parameters`` keyed by '/'-joined key paths.

A tree travels as ``Parameters(tensors, tensor_type=WIRE_FORMAT)`` with

    tensors[0]   = UTF-8 JSON {"names": [name_1, ..., name_L]}   (canonical order)
    tensors[i]   = flwr.common.ndarray_to_bytes(leaf named name_i)   (i = 1..L)

Names are the leaves' key paths joined with '/' (``lora/encoder/block_0/...``,
see :mod:`fedjax_fm.training.fingerprint`). Decoding matches leaves to a *template* by name,
never by position, and checks names, shapes and dtypes, so two sides whose dicts
were built in a different order still agree, and a mismatch (another model, LoRA vs
full fine-tuning) is an error naming the first differing leaf.

The payload size reported as "bytes actually sent" is ``Σ len(tensors[i])`` over all
tensors (header included): the application payload Flower hands to gRPC, before
protobuf/HTTP-2 framing and TLS overhead.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from flwr.common import Parameters, bytes_to_ndarray, ndarray_to_bytes

from fedjax_fm.training.fingerprint import key_path_name, named_leaves

WIRE_FORMAT = "fedjax_fm.named-ndarrays/1"


class WireError(ValueError):
    """A payload that does not match the expected pytree."""


def encode_tree(tree: Any) -> Parameters:
    """A pytree of arrays as Flower ``Parameters`` keyed by leaf names."""
    named = named_leaves(tree)
    header = json.dumps({"names": [name for name, _ in named]}).encode()
    tensors = [header] + [ndarray_to_bytes(np.asarray(jax.device_get(leaf))) for _, leaf in named]
    return Parameters(tensors=tensors, tensor_type=WIRE_FORMAT)


def empty_parameters() -> Parameters:
    """No payload (a client that was not sampled, or a server with nothing to send)."""
    return Parameters(tensors=[], tensor_type=WIRE_FORMAT)


def payload_bytes(parameters: Parameters) -> int:
    """Bytes of the application payload (see the module docstring)."""
    return int(sum(len(t) for t in parameters.tensors))


def decode_named(parameters: Parameters) -> dict[str, np.ndarray]:
    """``{name: array}`` of a payload made by :func:`encode_tree`."""
    if parameters.tensor_type != WIRE_FORMAT:
        raise WireError(f"payload format {parameters.tensor_type!r}, expected {WIRE_FORMAT!r}")
    if not parameters.tensors:
        raise WireError("empty payload: no header")
    try:
        names = json.loads(parameters.tensors[0].decode())["names"]
    except (ValueError, KeyError, UnicodeDecodeError) as error:
        raise WireError(f"payload header is not the expected JSON: {error}") from error
    if len(names) != len(parameters.tensors) - 1:
        raise WireError(f"payload header names {len(names)} leaves but {len(parameters.tensors) - 1} arrays follow")
    return {name: bytes_to_ndarray(blob) for name, blob in zip(names, parameters.tensors[1:])}


def decode_tree(parameters: Parameters, template: Any) -> Any:
    """The payload as a pytree with ``template``'s structure, leaves matched by name."""
    arrays = decode_named(parameters)
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = {key_path_name(path): leaf for path, leaf in flat}
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise WireError(f"payload leaves differ from the expected tree: missing {missing[:3]}, unexpected {extra[:3]}")
    leaves = []
    for path, leaf in flat:
        name = key_path_name(path)
        array = arrays[name]
        if tuple(array.shape) != tuple(np.shape(leaf)) or array.dtype != np.dtype(leaf.dtype):
            raise WireError(
                f"payload leaf {name} is {array.dtype}{list(array.shape)}, expected "
                f"{np.dtype(leaf.dtype)}{list(np.shape(leaf))}"
            )
        leaves.append(array)
    return jax.tree_util.tree_unflatten(treedef, leaves)


# -- secure aggregation: bare arrays --------------------------------------------------
#
# Flower's ``secaggplus_mod`` reads a device's ``FitRes.parameters`` with
# ``parameters_to_ndarrays`` (every tensor an array: no header) and the server gets the
# unmasked mean back as such a list. Both sides order the arrays by the leaf order of
# the same template (``jax.tree.leaves`` of the trainable variables), names checked
# through the template's structure rather than a header.


def encode_leaves(tree: Any, dtype: Any = np.float64) -> Parameters:
    """The leaves of ``tree`` as bare ``.npy`` tensors in ``jax.tree.leaves`` order, cast to ``dtype``
    (float64 for SecAgg+, so that its quantisation, not float32, rounds the values)."""
    tensors = [ndarray_to_bytes(np.asarray(jax.device_get(leaf), dtype)) for leaf in jax.tree.leaves(tree)]
    return Parameters(tensors=tensors, tensor_type="numpy.ndarray")


def decode_leaves(parameters: Parameters, template: Any) -> Any:
    """Bare tensors (as :func:`encode_leaves` or Flower's SecAgg+ workflow write them) as a pytree
    with ``template``'s structure and dtypes; counts and shapes are checked."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    if len(parameters.tensors) != len(flat):
        raise WireError(f"payload has {len(parameters.tensors)} arrays, expected {len(flat)} leaves")
    leaves = []
    for (path, leaf), blob in zip(flat, parameters.tensors):
        array = bytes_to_ndarray(blob)
        if tuple(array.shape) != tuple(np.shape(leaf)):
            raise WireError(f"payload leaf {key_path_name(path)} has shape {list(array.shape)}, expected "
                            f"{list(np.shape(leaf))}")
        leaves.append(array.astype(np.dtype(leaf.dtype)))
    return jax.tree_util.tree_unflatten(treedef, leaves)
