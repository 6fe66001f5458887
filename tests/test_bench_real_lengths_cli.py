"""``scripts/bench_real_lengths.py`` refuses bad input before any work: an unknown row, or
a row whose modules this Python cannot import (a clear install line, not a bare
``ModuleNotFoundError`` from a worker subprocess minutes in)."""

import importlib.util

import pytest


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench_real_lengths")


def test_an_unknown_row_is_refused_with_the_valid_ones(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--rows", "fedjax_fm packed,torch fast"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown row(s) ['torch fast']" in err and "fedjax_fm packed - attn core" in err


def test_a_missing_module_is_named_with_the_install_line(bench, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    assert bench.missing_modules({"jax"}) == []  # the jax rows do not need peft
    assert bench.missing_modules({"torch"}) == ["peft"]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--rows", "fedjax_fm packed,torch grouped"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot import peft" in err and 'pip install -e ".[test]" -c constraints.txt' in err
