"""How much of a client's text can an honest-but-curious server read back from
the smashed data it receives, and what does the client's noise defence cost?

    python benchmarks/privacy.py [--quick] [--noise 0,0.3,1,3] [--out DIR]

The server holds the frozen base model, so it can compute anything from it.
For each cut k it receives the client part's output (embeddings and blocks
[0, k) of SmolLM2-135M-Instruct, exactly ``client_part(...).client_forward``)
for every token of the client's text, with the noise of ``privacy.noise``
added exactly as clients add it (``splitft.split.client.add_noise``: Gaussian,
std = scale x each token's RMS), and tries to name each token:

- ``nearest``: the token whose input embedding is closest (cosine) to the
  hidden state; no training.
- ``linear``: a ridge-regression map from the hidden state at cut k back to
  the input embedding, fitted on clean public text (BIG-bench tasks none of
  the clients hold), then the nearest embedding.
- ``aware``: the same map fitted on the public text's activations noised at
  the configured scale (the server knows ``privacy.noise``: it is in the
  run's config). The honest threat model for the defence.

The victims' text is four BIG-bench tasks' training examples (prompt and
answer, ``BIGBENCH_TASKS``), as the clients hold them: this benchmark needs
the BIG-bench archive (docs/data.md), which the registry no longer serves.
The base model is attacked (a client's LoRA starts at zero and stays small).

The cost side: the demo's federation (configs/demo.yaml, cuts fixed at 8, 6,
4, 2 as in benchmarks/compression.py, same seed and data) trained once per
noise scale; final eval loss (of the unsplit global model, no noise at eval),
next-token, exact-match and multiple-choice accuracy, against noise 0.

On 2 CPU cores shared with another job: 27 min for the attacks, 25 for the
training with ``--threads 1`` (``--quick``: fewer examples, noise 0 and 1,
2 rounds of training, its attacks 8 min; ``--no-train``: the attacks only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import provenance, write_json  # noqa: E402

from splitft.config import BIGBENCH_TASKS, cache_dir, load_config  # noqa: E402
from splitft.data.bigbench import fetch_bigbench, load_task  # noqa: E402
from splitft.federation.simulation import Simulation  # noqa: E402
from splitft.models.default import default_model_dir  # noqa: E402
from splitft.models.parts import (  # noqa: E402
    WeightStore,
    client_part,
    load_model_config,
    load_tokenizer,
)
from splitft.split.client import add_noise  # noqa: E402

CUTS = (1, 2, 4, 8, 15)
NOISE = (0.0, 0.3, 1.0, 3.0)  # privacy.noise: std in units of a token's RMS
QUICK_NOISE = (0.0, 1.0)
# public text for the learned attack: BIG-bench tasks no client holds
PUBLIC = ("causal_judgment", "sports_understanding", "navigate")
VICTIM_SEED, PUBLIC_SEED = 0, 1  # the noise draws of the two texts differ


def texts(tasks, n: int) -> list[str]:
    out = []
    for task in tasks:
        for ex in load_task(task, cache_dir())[:n]:
            out.append(f"{ex.prompt} {ex.answer}")
    return out


def token_ids(tokenizer, strings: list[str], max_length: int) -> list[torch.Tensor]:
    return [
        torch.tensor(tokenizer(s, truncation=True, max_length=max_length)["input_ids"])
        for s in strings
    ]


@torch.no_grad()
def smashed(store, config, ids: list[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
    """Each cut's activations, one (T, H) tensor per example.

    One forward through the deepest client part gives every shallower cut
    (its hidden states after block k - 1); checked bitwise against
    ``client_forward`` of the part cut at k on the first example.
    """
    deep = client_part(store, config, max(CUTS))
    out: dict[int, list[torch.Tensor]] = {k: [] for k in CUTS}
    for seq in ids:
        x = seq[None]  # (1, T)
        pos = torch.arange(x.shape[1])[None]
        states = deep.decoder(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            position_ids=pos,
            use_cache=False,
            output_hidden_states=True,
        ).hidden_states
        for k in CUTS:
            out[k].append(states[k][0])
    x = ids[0][None]
    pos = torch.arange(x.shape[1])[None]
    for k in CUTS:
        sent = client_part(store, config, k).client_forward(x, torch.ones_like(x), pos)
        if not torch.equal(sent[0], out[k][0]):
            raise RuntimeError(f"cut {k}: hidden states differ from client_forward")
    return out


def noised(rows: list[torch.Tensor], scale: float, seed: int) -> torch.Tensor:
    """What clients send at ``privacy.noise = scale``, all tokens: (N, H)."""
    return torch.cat(
        [add_noise(h[None], scale, [seed, i])[0] for i, h in enumerate(rows)]
    )


def nearest(h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Index of the embedding row closest in cosine to each row of ``h``."""
    e = torch.nn.functional.normalize(emb, dim=-1)
    out = []
    for chunk in torch.split(h, 2048):
        out.append((torch.nn.functional.normalize(chunk, dim=-1) @ e.T).argmax(-1))
    return torch.cat(out)


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """W minimising |xW - y|^2 + lam |W|^2 (with a bias column)."""
    x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    a = x.T @ x + lam * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(a, x.T @ y.double()).float()


def apply(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.cat([h, torch.ones(len(h), 1)], 1) @ w


def attack(args, scales: list[float], per_task: int) -> dict:
    """Token recovery per cut, noise scale and attacker."""
    fetch_bigbench([*BIGBENCH_TASKS, *PUBLIC], cache_dir())
    folder = default_model_dir()
    config, tokenizer = load_model_config(folder), load_tokenizer(folder)
    store = WeightStore(folder)
    emb = client_part(store, config, 1).model.get_input_embeddings()
    emb = emb.weight.detach().float()  # (V, H)
    victim_ids = token_ids(tokenizer, texts(BIGBENCH_TASKS, per_task), 128)
    public_ids = token_ids(tokenizer, texts(PUBLIC, 3 * per_task), 128)
    truth, public_truth = torch.cat(victim_ids), torch.cat(public_ids)
    target = emb[public_truth]
    print(
        f"victims: {len(victim_ids)} examples, {len(truth)} tokens; public text: "
        f"{len(public_ids)} examples, {len(public_truth)} tokens"
    )
    victim = smashed(store, config, victim_ids)
    public = smashed(store, config, public_ids)
    rows, examples, first = [], {}, len(victim_ids[0])
    for k in CUTS:
        w_clean = ridge(torch.cat(public[k]), target, args.ridge)
        for s in scales:
            h = noised(victim[k], s, VICTIM_SEED)
            guess = {
                "nearest": nearest(h, emb),
                "linear": nearest(apply(w_clean, h), emb),
            }
            guess["aware"] = guess["linear"]  # without noise, the same map
            if s > 0:
                w = ridge(noised(public[k], s, PUBLIC_SEED), target, args.ridge)
                guess["aware"] = nearest(apply(w, h), emb)
            row = {"cut": k, "noise": s}
            row.update(
                {a: float((g == truth).float().mean()) for a, g in guess.items()}
            )
            rows.append(row)
            examples[f"{k}/{s:g}"] = tokenizer.decode(guess["aware"][:first])
            print(
                f"cut {k:>2} noise {s:<4g}: nearest {row['nearest']:.3f}  "
                f"linear {row['linear']:.3f}  aware {row['aware']:.3f}",
                flush=True,
            )
    return {
        "victim_tokens": len(truth),
        "public_tokens": len(public_truth),
        "rows": rows,
        "example_truth": tokenizer.decode(victim_ids[0]),
        "examples": examples,
    }


def train(args, out: Path, scale: float) -> dict:
    """The demo federation with fixed cuts at one noise scale (as
    benchmarks/compression.py runs it); the final round's evaluation."""
    overrides = [
        f"name=noise-{scale:g}",
        f"out_dir={out}",
        "federation.policy=fixed",
        "federation.cut_layers=[8, 6, 4, 2]",
        f"privacy.noise={scale}",
        "data.source=bigbench",  # the victims' tasks
    ]
    if args.quick:
        overrides.append("federation.rounds=2")
    t0 = time.perf_counter()
    sim = Simulation(load_config(Path("configs/demo.yaml"), overrides))
    sim.run(table=False)
    last = sim.rounds[-1]
    row = {"noise": scale, "rounds": last["round"], "wall_s": time.perf_counter() - t0}
    for key in ("eval_loss", "eval_token_acc", "exact_match", "mc_accuracy"):
        row[key] = last.get(key)
    print(f"trained at noise {scale:g}: eval loss {row['eval_loss']:.4f}", flush=True)
    return row


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/bench/privacy")
    ap.add_argument("--examples", type=int, default=None, help="per task")
    ap.add_argument("--ridge", type=float, default=1.0)
    ap.add_argument(
        "--noise",
        default=None,
        help="privacy.noise scales, comma-separated (default 0,0.3,1,3; "
        "--quick 0,1); 0 is always included as the baseline",
    )
    ap.add_argument("--no-train", action="store_true", help="the attacks only")
    ap.add_argument("--no-attack", action="store_true", help="the training only")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); 1 on a box shared with "
        "another job avoids oversubscribing the cores",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    per_task = args.examples or (25 if args.quick else 100)
    given = [float(s) for s in args.noise.split(",")] if args.noise else None
    scales = sorted({0.0, *(given or (QUICK_NOISE if args.quick else NOISE))})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    t0 = time.perf_counter()

    results = {**prov, "noise": scales, "rows": [], "examples": {}}
    if not args.no_attack:
        results.update(attack(args, scales, per_task))
    results["attack_wall_s"] = time.perf_counter() - t0
    write_json(out / "results.json", results)  # kept if training fails
    training = [] if args.no_train else [train(args, out, s) for s in scales]
    for r in training:
        r["eval_loss_cost"] = r["eval_loss"] / training[0]["eval_loss"] - 1
    results["training"] = training
    results["wall_s"] = time.perf_counter() - t0
    write_json(out / "results.json", results)

    if results["rows"]:
        print(f"\nshare of tokens recovered ({results['victim_tokens']} tokens)")
        print(f"{'cut':>4} {'noise':>6} {'nearest':>8} {'linear':>8} {'aware':>8}")
    for r in results["rows"]:
        print(
            f"{r['cut']:>4} {r['noise']:>6g} {r['nearest']:>8.3f} "
            f"{r['linear']:>8.3f} {r['aware']:>8.3f}"
        )
    if results["examples"]:
        print(f"\nthe client's text:    {results['example_truth']!r}")
    for key, text in results["examples"].items():
        cut, s = key.split("/")
        print(f"cut {cut:>2}, noise {s:<4}: {text!r}  (aware)")
    if training:
        print(
            f"\n{'noise':>6} {'eval loss':>9} {'cost':>7} {'token acc':>9} "
            f"{'EM':>6} {'MC':>6}   (demo federation, cuts 8/6/4/2, "
            f"{training[0]['rounds']} rounds)"
        )
        for r in training:
            print(
                f"{r['noise']:>6g} {r['eval_loss']:>9.4f} "
                f"{100 * r['eval_loss_cost']:>6.2f}% {fmt(r['eval_token_acc']):>9} "
                f"{fmt(r['exact_match']):>6} {fmt(r['mc_accuracy']):>6}"
            )
    print(f"\n{prov['command']}: {results['wall_s'] / 60:.1f} min; {out}/results.json")


if __name__ == "__main__":
    main()
