"""The real default model (SmolLM2-135M-Instruct) and the real BIG-bench data."""

import json

import pytest
import torch

from splitft.config import load_config
from splitft.federation.simulation import Simulation


@pytest.mark.integration
def test_two_clients_different_cuts_one_round(tmp_path):
    cfg = load_config(
        None,
        [
            f"out_dir={tmp_path}",
            "name=it",
            "federation.num_clients=2",
            "federation.rounds=1",
            "federation.local_steps=1",
            "federation.cut_layers=[3, 11]",
            "data.tasks=[arithmetic/2_digit_addition, date_understanding]",
            "data.eval_size=4",
            "data.max_train_per_task=16",
            "train.batch_size=2",
        ],
    )
    summary = Simulation(cfg).run()
    run = tmp_path / "it"
    rounds = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in rounds if r["type"] == "step"]
    assert {s["cut_layer"] for s in steps} == {3, 11}
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    last = summary["rounds"][-1]
    assert torch.isfinite(torch.tensor(last["eval_loss"]))
    assert last["up_smashed"] > 0 and last["down_gradients"] > 0
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert (run / "adapter" / "adapter_config.json").exists()
    assert (run / "config.yaml").exists() and (run / "summary.json").exists()

    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(summary["model"])
    model = peft.PeftModel.from_pretrained(base, run / "adapter")
    n = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert n > 0
