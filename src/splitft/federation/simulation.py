"""A federation of split-learning clients simulated in one process.

A recipe in the torchtune sense: ``setup`` builds everything from the config,
``train`` owns the round loop, ``finish`` writes the adapter and the summary.
Clients reach the server through a transport, exactly as deployed clients
will; only the transport differs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from splitft import lora, report
from splitft.config import ConfigError, RunConfig, save_config, to_dict
from splitft.data.federated import load_run_data
from splitft.data.format import pad_token_id
from splitft.data.packing import pack
from splitft.eval import evaluate, task_accuracy
from splitft.models.default import resolve_model_dir
from splitft.models.parts import WeightStore, full_part, load_model_config
from splitft.split.client import SplitClient
from splitft.split.server import SplitServer
from splitft.transport import InProcessTransport, Traffic

TOKENS = ["input_ids", "labels"]  # the columns training and the loss need


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Simulation:
    """Runs ``cfg.federation.rounds`` rounds of split federated fine-tuning."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir: Path = cfg.run_dir
        self.rounds: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.model_dir = resolve_model_dir(cfg.model.path)
        self.config = load_model_config(self.model_dir)
        L = self.config.num_hidden_layers
        bad = [k for k in cfg.federation.cut_layers if not 1 <= k < L]
        if bad:
            raise ConfigError(
                f"federation.cut_layers={cfg.federation.cut_layers} is not allowed: "
                f"each cut must be in [1, {L - 1}] for this {L}-layer model"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.pad_id = pad_token_id(self.tokenizer)
        self.data = load_run_data(cfg, self.tokenizer)
        self.store = WeightStore(
            self.model_dir, device=resolve_device(cfg.model.device)
        )
        fed = cfg.federation
        self.cut_layers = {
            cid: fed.cut_layers[cid % len(fed.cut_layers)]
            for cid in range(fed.num_clients)
        }
        per_round = fed.clients_per_round or fed.num_clients
        self.server = SplitServer(
            self.store,
            self.config,
            cfg.lora,
            cfg.train,
            self.cut_layers,
            total_steps=fed.rounds * fed.local_steps,
            local_steps=fed.local_steps,
            seed=cfg.seed,
        )
        self.clients = {
            cid: SplitClient(
                cid,
                self.store,
                self.config,
                cfg.lora,
                cfg.train,
                self._client_rows(cid),
                self.pad_id,
                seed=cfg.seed,
                num_samples=len(self.data.partitions[cid]),
            )
            for cid in range(fed.num_clients)
        }
        self.traffic = Traffic()
        self.transports = {
            cid: InProcessTransport(self.server, self.traffic) for cid in self.clients
        }
        self.eval_examples = self.data.held_out.select_columns(TOKENS).to_list()
        self.accuracy_examples = _per_task(
            self.data.held_out.select_columns(
                ["task", "prompt", "answer", "choices", "correct"]
            ),
            cfg.eval.accuracy_examples,
        )
        self.evaluator = full_part(self.store, self.config)
        ranks = lora.layer_ranks(range(L), cfg.lora, cut=False)
        lora.inject(self.evaluator.model, self.evaluator.spec, cfg.lora, ranks)
        self._rng = np.random.default_rng(cfg.seed)
        self.per_round = per_round
        _keep_previous(self.run_dir)
        self.run_dir.mkdir(parents=True)
        save_config(cfg, self.run_dir / "config.yaml")
        self.log = report.MetricsLog(self.run_dir / "metrics.jsonl")

    def _client_rows(self, cid: int) -> list[dict]:
        rows = self.data.partitions[cid].select_columns(TOKENS).to_list()
        return pack(rows, self.cfg.data.max_length) if self.cfg.data.packing else rows

    # ---------------------------------------------------------------- train
    def evaluate_global(self, accuracy: bool) -> dict[str, Any]:
        """Evaluate the global adapter on the unsplit model (what is exported)."""
        lora.load_adapter_state(self.evaluator.model, self.server.global_state)
        bs = self.cfg.train.batch_size * 2
        result: dict[str, Any] = evaluate(
            self.evaluator, self.eval_examples, bs, self.pad_id
        )
        if accuracy:
            per_task = task_accuracy(
                self.evaluator,
                self.tokenizer,
                self.accuracy_examples,
                self.cfg.eval.max_new_tokens,
                self.cfg.data.max_length,
                bs,
            )
            result["task_accuracy"] = per_task
            for metric in ("exact_match", "mc_accuracy"):
                values = [t[metric] for t in per_task.values() if metric in t]
                if values:  # macro average over the tasks that have it
                    result[metric] = sum(values) / len(values)
        return result

    def _accuracy_due(self, rnd: int) -> bool:
        e, last = self.cfg.eval, self.cfg.federation.rounds
        if not e.accuracy:
            return False
        return rnd in (0, last) or (
            e.accuracy_every > 0 and rnd % e.accuracy_every == 0
        )

    def train(self) -> list[dict[str, Any]]:
        cfg, fed = self.cfg, self.cfg.federation
        t_start = time.perf_counter()
        base = {
            "type": "round",
            "round": 0,
            **self.evaluate_global(self._accuracy_due(0)),
            "elapsed_s": time.perf_counter() - t_start,
        }
        self.log.write(base)
        self.rounds.append(base)
        bar = tqdm(
            total=fed.rounds * self.per_round * fed.local_steps,
            desc="split training",
            unit="step",
        )
        for rnd in range(fed.rounds):
            before = dict(self.traffic.snapshot())
            chosen = sorted(
                self._rng.choice(fed.num_clients, self.per_round, replace=False)
            )
            losses, tokens = [], 0
            for cid in chosen:
                bar.set_postfix(round=rnd + 1, client=int(cid))
                for step in self.clients[cid].run_round(self.transports[cid], rnd):
                    self.log.write({"type": "step", **step})
                    losses.append(step["loss"] * step["tokens"])
                    tokens += step["tokens"]
                    bar.update(1)
                    bar.set_postfix(
                        round=rnd + 1, client=int(cid), loss=f"{step['loss']:.3f}"
                    )
            self.server.aggregate()
            # aggregated adapters go back to every holder with the next plan;
            # they are counted when sent.
            traffic = {
                k: v - before.get(k, 0) for k, v in self.traffic.snapshot().items()
            }
            record = {
                "type": "round",
                "round": rnd + 1,
                "clients": [int(c) for c in chosen],
                "train_loss": sum(losses) / max(tokens, 1),
                "train_tokens": tokens,
                "bytes_up": sum(v for k, v in traffic.items() if k.startswith("up_")),
                "bytes_down": sum(
                    v for k, v in traffic.items() if k.startswith("down_")
                ),
                **traffic,
            }
            accuracy = self._accuracy_due(rnd + 1)
            if accuracy or (rnd + 1) % cfg.eval.every == 0 or rnd + 1 == fed.rounds:
                record.update(self.evaluate_global(accuracy))
            record["elapsed_s"] = time.perf_counter() - t_start
            self.log.write(record)
            self.rounds.append(record)
        bar.close()
        return self.rounds

    # ---------------------------------------------------------------- finish
    def finish(self) -> dict[str, Any]:
        """Export the global adapter in PEFT format and write summary.json."""
        adapter_dir = lora.export_peft(
            self.server.global_state,
            self.config,
            self.cfg.lora,
            self.run_dir / "adapter",
            str(self.model_dir),
        )
        totals = self.traffic.snapshot()
        summary = {
            "run": self.cfg.name,
            "model": str(self.model_dir),
            "cut_layers": self.cut_layers,
            "data": self.data.info,
            "rounds": self.rounds,
            "bytes": totals,
            "adapter": str(adapter_dir),
            "config": to_dict(self.cfg),
        }
        report.write_summary(self.run_dir / "summary.json", summary)
        self.log.close()
        return summary

    def run(self) -> dict[str, Any]:
        self.setup()
        self.train()
        summary = self.finish()
        report.print_table(self.rounds, f"SplitFT run {self.cfg.name!r}")
        return summary


def _per_task(held_out, limit: int) -> list[dict]:
    """The first ``limit`` held-out examples of each task (the split is seeded)."""
    seen: dict[str, int] = {}
    keep = []
    for row in held_out.to_list():
        if seen.get(row["task"], 0) < limit:
            seen[row["task"]] = seen.get(row["task"], 0) + 1
            keep.append(row)
    return keep


def _keep_previous(run_dir: Path) -> None:
    """Move an earlier run of the same name aside rather than mix or lose it."""
    if not run_dir.exists():
        return
    n = 1
    while (old := run_dir.with_name(f"{run_dir.name}.{n}")).exists():
        n += 1
    run_dir.rename(old)
    print(f"an earlier run {run_dir} was moved to {old}")
