"""A tiny federation to run end to end: a tiny llama, a local data file."""

import json
import signal
from pathlib import Path

import pytest
import synthetic
import torch
from safetensors.torch import load_file
from tiny import make_tiny, make_tokenizer

from splitft import interrupts
from splitft.config import load_config
from splitft.federation.simulation import Simulation

QUESTIONS = [
    {"instruction": f"What is {a} plus {b}?", "output": str(a + b)}
    for a in range(10)
    for b in range(7)
]


def make_assets(root):
    """The tiny model and data a federation test runs on, under ``root``."""
    tok = make_tokenizer()
    make_tiny("llama", root / "model", vocab_size=len(tok))
    tok.save_pretrained(root / "model")
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return root


def base_settings(assets, out_dir) -> list[str]:
    """What every tiny-model run sets: the model, the data, small batches."""
    return [
        f"model.path={assets / 'model'}",
        "model.device=cpu",
        f"data.source={assets / 'qa.jsonl'}",
        "data.max_length=32",
        "data.eval_size=8",
        f"out_dir={out_dir}",
        "eval.accuracy=false",
        "train.batch_size=2",
        "log.plots=false",  # tests/test_plots.py draws them
        "log.to=[jsonl]",  # tests/test_trackers.py logs to the trackers
    ]


def config(assets, tmp_path, *overrides):
    return load_config(
        None,
        [
            *base_settings(assets, tmp_path),
            "federation.num_clients=4",
            "federation.rounds=3",
            "federation.local_steps=2",
            "federation.cut_layers=[1, 2, 3, 2]",
            "sim.mix=[workstation, laptop, tablet, phone]",
            "sim.server_speed=2.0",
            *overrides,
        ],
    )


def interrupt_after(rnd):
    """A ``stop`` for ``Coordinator.run``: SIGINT's Interrupted once round
    ``rnd`` is checkpointed (as Ctrl-C there would)."""

    def stop(record):
        if record["round"] == rnd:
            raise interrupts.Interrupted(signal.SIGINT)
        return False

    return stop


def whole_and_interrupted(assets, tmp_path, common, after, *cut_settings):
    """Run ``whole`` (uninterrupted, local) and ``cut`` (``cut_settings``
    added), interrupted once round ``after`` is checkpointed; their configs."""
    whole = config(assets, tmp_path, "name=whole", *common)
    Simulation(whole, synthetic.costs(num_layers=4)).run(table=False)
    cut = config(assets, tmp_path, "name=cut", *cut_settings, *common)
    with pytest.raises(interrupts.Interrupted):
        Simulation(cut, synthetic.costs(num_layers=4)).run(
            interrupt_after(after), table=False
        )
    return whole, cut


def run(cfg, costs=None):
    sim = Simulation(cfg, costs)
    summary = sim.run()
    return sim, summary


TIMING_FREE = {
    "elapsed_s",
    "planner_s",
    "timing",
    "spans",
    "server_busy_s",
    "wall_round_s",
}


def rounded(x, digits=7):
    """Floats to ``digits`` significant digits, recursively (CPU kernels may
    differ in the last bits between runs)."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    return x


def comparable(rounds):
    return [
        rounded({k: v for k, v in r.items() if k not in TIMING_FREE}) for r in rounds
    ]


def adapter_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_run(a: Path, b: Path) -> None:
    """Same adapter and the same metrics, bar wall-clock times."""
    ta, tb = adapter_of(a), adapter_of(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert comparable(sa["rounds"]) == comparable(sb["rounds"])
    assert sa["bytes"] == sb["bytes"] and sa["sim_time_s"] == sb["sim_time_s"]

    def steps(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        drop = {"client_seconds", "server_seconds", *TIMING_FREE}
        return [rounded({k: v for k, v in r.items() if k not in drop}) for r in records]

    assert steps(a) == steps(b)  # every record once, in order, after the resume
