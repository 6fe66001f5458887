"""The experiment config schema: YAML loading, --set overrides, errors with suggestions, the paper grid."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fedjax_fm.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"


def test_defaults_validate_and_roundtrip(tmp_path):
    config = config_from_dict({})
    assert isinstance(config, ExperimentConfig)
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_default_demo_config_is_lora_fedadam_on_synthetic_data():
    config = load_config(REPO / "configs" / "default.yaml")
    assert config.model.name == "demo-base" and config.model.init == "pretrained"
    assert config.lora is not None
    assert config.federated.server_optimizer.name == "fedadam"
    assert config.data.source.kind == "synthetic"
    assert config.federated.num_clients > 1


def test_unknown_key_names_the_path_and_suggests_the_closest():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"federated": {"clients_per_rund": 3}})
    message = str(error.value)
    assert "federated.clients_per_rund" in message
    assert "did you mean 'clients_per_round'" in message
    assert "num_clients" in message  # the valid keys are listed


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="did you mean 'federated'"):
        config_from_dict({"federatd": {}})


def test_bad_choice_lists_the_valid_ones_with_a_suggestion():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"federated": {"server_optimizer": {"name": "fedadm"}}})
    message = str(error.value)
    assert "federated.server_optimizer.name" in message
    assert "fedavgm" in message and "did you mean 'fedadam'" in message


def test_bad_types_and_ranges():
    with pytest.raises(ConfigError, match="federated.rounds: expected an integer"):
        config_from_dict({"federated": {"rounds": "ten"}})
    with pytest.raises(ConfigError, match="federated.rounds must be positive"):
        config_from_dict({"federated": {"rounds": 0}})
    with pytest.raises(ConfigError, match="clients_per_round .* exceeds"):
        config_from_dict({"federated": {"num_clients": 2, "clients_per_round": 3}})
    with pytest.raises(ConfigError, match="eval.num_beams must be positive"):
        config_from_dict({"eval": {"num_beams": 0}})
    with pytest.raises(ConfigError, match="energy.watts"):
        config_from_dict({"energy": {"backend": "constant"}})
    with pytest.raises(ConfigError, match="lora.target_modules"):
        config_from_dict({"lora": {"target_modules": ["query"]}})
    with pytest.raises(ConfigError, match="data.source.kind"):
        config_from_dict({"data": {"source": {"kind": "synthetik"}}})


def test_overrides_are_yaml_typed_and_create_sections():
    data = apply_overrides({}, ["federated.rounds=5", "federated.server_optimizer.tau=1e-3", "lora.target_modules=[q, k]",
                                "output.export=false", "seed=7"])
    config = config_from_dict(data)
    assert config.federated.rounds == 5
    assert config.federated.server_optimizer.tau == pytest.approx(1e-3)
    assert config.lora.target_modules == ("q", "k")
    assert config.output.export is False and config.seed == 7


def test_lora_null_means_full_fine_tuning(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora: {rank: 4}\n")
    assert load_config(path).lora.rank == 4
    assert load_config(path, ["lora=null"]).lora is None


def test_bad_override_syntax_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["federated.rounds"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("federated: {rounds: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("eval: {evry: 3}\n")
    with pytest.raises(ConfigError, match=str(typo)):
        load_config(typo)


def test_base_files_merge_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text("federated: {rounds: 9, num_clients: 6}\nlora: {rank: 2}\n")
    (tmp_path / "cell.yaml").write_text("base: base.yaml\nfederated: {rounds: 3}\nlora: null\n")
    config = load_config(tmp_path / "cell.yaml")
    assert config.federated.rounds == 3 and config.federated.num_clients == 6 and config.lora is None


def _paper_generator():
    spec = importlib.util.spec_from_file_location("paper_generate", PAPER / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_grid_files_are_current_and_complete():
    generator = _paper_generator()
    cells = generator.cells()
    assert len(cells) == 4 * 2 * 5
    for relative, text in cells.items():
        assert (PAPER / relative).read_text() == text, f"{relative} is stale: run python configs/paper/generate.py"
    on_disk = {p.relative_to(PAPER) for p in PAPER.glob("*/*.yaml")}
    assert on_disk == set(cells)


@pytest.mark.parametrize("path", sorted(PAPER.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_paper_config_validates(path):
    config = load_config(path)
    model, (mode, optimizer) = path.parent.name, path.stem.split("-", 1)
    assert config.model.name == f"google/{model}"
    assert (config.lora is None) == (mode == "full")
    assert config.federated.server_optimizer.name == optimizer
    # The paper's documented defaults.
    assert config.data.source.kind == "tfds" and config.data.source.name == "samsum"
    assert config.data.partition.method == "dirichlet_quantity" and config.data.partition.alpha == 1.0
    assert config.data.prompt_template.startswith("summarize: ")
    assert (config.data.max_input_length, config.data.max_target_length) == (512, 95)
    local = config.federated.local_optimizer
    assert (local.name, local.learning_rate) == ("adamw", 1e-4)
    if optimizer in ("fedadam", "fedadamw", "fedyogi"):
        server = config.federated.server_optimizer
        assert server.learning_rate == pytest.approx(10**-1.5)
        assert (server.b1, server.b2, server.tau) == (0.9, 0.99, 1e-2)
    assert config_to_dict(config)["federated"]["server_optimizer"]["name"] == optimizer
