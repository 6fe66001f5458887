"""A device rebuilds, from its own file alone, the round batches simulation gives that client."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_fm.training import builders as setup
from fedjax_fm.config import ConfigError, load_config
from fedjax_fm.deploy.assemble import check_deployable
from fedjax_fm.deploy.device_data import DeviceData
from fedjax_fm.data.local_files import write_jsonl

CONFIG = """\
seed: 11
model: {{name: tiny, init: random, tokenizer: byt5, vocab_size: 512}}
data:
  source: {{kind: client_folder, path: {folder}, eval_path: {eval}}}
  partition: {{method: natural}}
  max_input_length: 40
  max_target_length: 12
federated: {{rounds: 1, num_clients: 3, clients_per_round: 3, local_steps: 3, local_epochs: null, batch_size: 2}}
"""


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_device_batches_equal_simulation_batches(tmp_path, packing):
    sizes = {"ann": 4, "ben": 1, "cyd": 9}
    for name, n in sizes.items():
        rows = [{"id": str(i), "dialogue": f"{name} says {i} twice {i}", "summary": f"{name} {i}"} for i in range(n)]
        write_jsonl(tmp_path / "all" / f"{name}.jsonl", rows)
        write_jsonl(tmp_path / "dev" / name / f"{name}.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", [{"id": "0", "dialogue": "x", "summary": "y"}])
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(folder=tmp_path / "all", eval=tmp_path / "eval.jsonl"))
    cfg = load_config(path, ["data.packing={enabled: true, input_length: 80, target_length: 24}"] if packing else [])
    check_deployable(cfg)
    tokenizer = setup.build_tokenizer(cfg, tmp_path, lambda: [])
    data = setup.build_data(cfg, tokenizer)
    for position, name in enumerate(data.client_ids):
        device = DeviceData(cfg, tokenizer, tmp_path / "dev" / name)
        assert device.client_id == name and device.num_examples == sizes[name]
        for round_index in (0, 4):
            want = data.client_round_batches(position, round_index)
            got = device.round_batches(position, round_index)
            assert sorted(got) == sorted(want)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} round {round_index} {key}")


def test_settings_a_deployment_cannot_honour_are_named(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(folder=tmp_path, eval=tmp_path / "e.jsonl"))
    with pytest.raises(ConfigError, match="train-sentencepiece"):
        check_deployable(load_config(path, ["model.tokenizer=train-sentencepiece"]))
    with pytest.raises(ConfigError, match="local_steps"):
        check_deployable(load_config(path, ["federated.local_steps=null", "federated.local_epochs=1.0"]))
