"""Lineage: hash chain, tamper detection, truncate-and-resume; environment; data fingerprints; per-client stats."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest

from fedjax_fm.eval.per_client import per_client_summary
from fedjax_fm.training.fingerprint import params_sha256
from fedjax_fm.training.environment import environment
from fedjax_fm.training.lineage import (
    GENESIS_HASH,
    LineageWriter,
    config_sha256,
    data_fingerprint,
    read_lineage,
    truncate_lineage,
    verify_lineage,
)

ENV = {"python": "3.x", "fedjax_fm": {"version": "0.1.0", "git_commit": "abc", "git_dirty": False}, "xla_flags": None}


def client_data(c):
    rng = np.random.default_rng(c)
    return {"input_ids": rng.integers(0, 100, size=(3, 8), dtype=np.int32), "labels": np.full((3, 4), c, np.int32)}


def params_at(t):
    return {"w": np.full((2, 3), float(t), np.float32)}


def write_rounds(path, rounds, start=1, env=ENV):
    writer = LineageWriter(path)
    for t in range(start, start + rounds):
        ids = [t % 5, (t + 2) % 5]
        writer.append(
            round_index=t,
            client_ids=ids,
            num_examples=[3.0, 7],
            data_sha256=[data_fingerprint(client_data(c)) for c in ids],
            config_sha256=config_sha256({"seed": 0, "federated": {"rounds": 6}}),
            params_sha256=params_sha256(params_at(t)),
            environment=env,
            extra={"epsilon": 0.1 * t},
        )
    return writer


def test_fresh_chain_verifies_and_links(tmp_path):
    write_rounds(tmp_path, 4)
    entries = read_lineage(tmp_path)
    assert [e["round"] for e in entries] == [1, 2, 3, 4]
    assert entries[0]["prev_hash"] == GENESIS_HASH
    assert all(b["prev_hash"] == a["entry_hash"] for a, b in zip(entries, entries[1:]))
    assert "environment" in entries[0] and all("environment" not in e for e in entries[1:])
    assert len({e["environment_sha256"] for e in entries}) == 1
    check = verify_lineage(tmp_path, final_params_sha256=params_sha256(params_at(4)))
    assert check.ok and check.num_entries == 4 and check.last_round == 4, check
    # Also by file path.
    assert verify_lineage(tmp_path / "lineage.jsonl")


def test_changed_environment_is_recorded_again(tmp_path):
    write_rounds(tmp_path, 2)
    write_rounds(tmp_path, 2, start=3, env=dict(ENV, xla_flags="--xla_foo"))
    entries = read_lineage(tmp_path)
    assert ["environment" in e for e in entries] == [True, False, True, False]
    assert verify_lineage(tmp_path)


def test_one_byte_edit_names_the_entry(tmp_path):
    write_rounds(tmp_path, 4)
    path = tmp_path / "lineage.jsonl"
    data = bytearray(path.read_bytes())
    third = data.index(b'"round":3')
    # Change one digit of round 3's example count (3 -> 4): still valid JSON, wrong hash.
    pos = data.index(b'"num_examples":3', data.rfind(b"\n", 0, third) + 1) + len(b'"num_examples":')
    data[pos] = ord("4")
    path.write_bytes(bytes(data))
    check = verify_lineage(tmp_path)
    assert not check.ok
    assert check.first_bad_line == 3 and check.first_bad_round == 3
    assert "line 3 (round 3)" in check.reason and "entry_hash" in check.reason


def test_any_flipped_byte_is_caught_at_its_entry(tmp_path):
    write_rounds(tmp_path, 3)
    path = tmp_path / "lineage.jsonl"
    original = path.read_bytes()
    start = original.index(b"\n") + 1
    end = original.index(b"\n", start)  # line 2, without its newline
    for pos in range(start, end, 7):
        data = bytearray(original)
        data[pos] ^= 1
        path.write_bytes(bytes(data))
        check = verify_lineage(path)
        assert not check.ok and check.first_bad_line == 2, (pos, check)


def test_edit_with_rehash_breaks_the_next_link(tmp_path):
    write_rounds(tmp_path, 3)
    path = tmp_path / "lineage.jsonl"
    entries = read_lineage(path)
    forged = dict(entries[1], params_sha256="0" * 64)
    from fedjax_fm.training.lineage import _entry_hash, canonical_json

    forged["entry_hash"] = _entry_hash(forged)
    entries[1] = forged
    path.write_text("".join(canonical_json(e) + "\n" for e in entries), encoding="ascii")
    check = verify_lineage(path)
    assert not check.ok and check.first_bad_round == 3 and "prev_hash" in check.reason


def test_changed_final_params_fail(tmp_path):
    write_rounds(tmp_path, 3)
    check = verify_lineage(tmp_path, final_params_sha256=params_sha256(params_at(99)))
    assert not check.ok and "round 3" in check.reason and check.first_bad_line is None


def test_truncate_and_reappend_reproduces_the_file(tmp_path):
    write_rounds(tmp_path, 5)
    path = tmp_path / "lineage.jsonl"
    original = path.read_bytes()
    assert truncate_lineage(path, 2) == 2
    assert [e["round"] for e in read_lineage(path)] == [1, 2]
    assert verify_lineage(path)
    write_rounds(tmp_path, 3, start=3)  # the resumed run writes rounds 3..5 again
    assert path.read_bytes() == original


def test_truncate_drops_a_partial_last_line(tmp_path):
    write_rounds(tmp_path, 3)
    path = tmp_path / "lineage.jsonl"
    original = path.read_bytes()
    path.write_bytes(original + b'{"round":4,"clie')  # killed mid-write
    assert not verify_lineage(path)
    assert truncate_lineage(path, 10) == 3
    assert path.read_bytes() == original


def test_rounds_must_increase(tmp_path):
    writer = write_rounds(tmp_path, 2)
    with pytest.raises(ValueError, match="does not follow"):
        writer.append(
            round_index=2,
            client_ids=[],
            num_examples=[],
            data_sha256=[],
            config_sha256="x",
            params_sha256="y",
            environment=ENV,
        )


def test_data_fingerprint_is_canonical():
    a = client_data(1)
    reordered = {"labels": a["labels"], "input_ids": a["input_ids"]}
    assert data_fingerprint(a) == data_fingerprint(reordered)
    changed = dict(a, labels=a["labels"].copy())
    changed["labels"][0, 0] += 1
    assert data_fingerprint(a) != data_fingerprint(changed)
    assert data_fingerprint(a) != data_fingerprint(dict(a, labels=a["labels"].astype(np.int64)))


def test_environment_records_versions_and_devices():
    env = environment()
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        assert env["packages"][name], name
    assert env["devices"]["device_kinds"] and env["devices"]["backend"]
    assert env["fedjax_fm"]["version"]
    assert "xla_flags" in env
    assert env["host_cpu"]["logical_cpus"] and len(env["host_cpu"]["isa_signature"]) == 12
    json.dumps(env)  # JSON-ready
    assert environment() == env  # deterministic on one machine


def test_host_cpu_reads_the_instruction_sets_from_cpuinfo():
    from fedjax_fm.training.environment import host_cpu

    text = ("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 sse2 avx512f lm fma\n\n"
            "processor\t: 1\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 sse2 avx512f lm fma\n")
    cpu = host_cpu(text)
    assert cpu["isa"] == ["avx2", "avx512f", "fma", "sse2"]  # ISA flags only, sorted, first processor
    assert cpu["model"] in ("Some Xeon", platform.processor())
    without_avx512 = host_cpu(text.replace(" avx512f", ""))
    assert without_avx512["isa_signature"] != cpu["isa_signature"]  # a different rounding kind
    assert host_cpu(text)["isa_signature"] == cpu["isa_signature"]
    assert host_cpu("")["isa"] == []


def test_per_client_summary():
    one = per_client_summary({7: 0.42}, {7: 13}, metric="rougeL")
    assert one.mean == one.weighted_mean == one.worst_decile == one.p10 == 0.42 and one.std == 0.0
    assert one.table == [{"client": 7, "value": 0.42, "num_examples": 13.0}]
    values = {c: float(c) for c in range(20)}  # higher is better: clients 0 and 1 are the worst decile
    s = per_client_summary(values, {c: 1 + (c == 19) * 19 for c in range(20)})
    assert s.worst_decile == 0.5 and s.worst_decile_clients == [0, 1]
    assert s.mean == pytest.approx(9.5) and s.std == pytest.approx(np.std(np.arange(20)))
    assert s.weighted_mean == pytest.approx((sum(range(19)) + 19 * 20) / 39)
    assert s.p10 == pytest.approx(np.percentile(np.arange(20), 10))
    loss = per_client_summary(values, higher_is_better=False, metric="loss")
    assert loss.worst_decile == 18.5 and loss.table[0]["client"] == 19
    with pytest.raises(ValueError, match="non-finite"):
        per_client_summary({1: float("nan")})
