"""How much of a client's text can an honest-but-curious server read back from
the smashed data it receives?

    python benchmarks/privacy.py [--quick] [--out runs/bench/privacy]

The server holds the frozen base model, so it can compute anything from it.
For each cut k it receives the client part's output (embeddings and blocks
[0, k) of SmolLM2-135M-Instruct, exactly ``client_part(...).client_forward``)
for every token of the client's text, and tries to name each token:

- ``nearest``: the token whose input embedding is closest (cosine) to the
  hidden state; no training.
- ``linear``: a ridge-regression map from the hidden state at cut k back to
  the input embedding, fitted on public text (BIG-bench tasks none of the
  clients hold), then the nearest embedding; a learned inversion in closed
  form.

The victims' text is the default tasks' training examples (prompt and
answer), as the clients hold them. Prints token recovery accuracy per cut and
attack and a few reconstructed examples. The base model is attacked (a
client's LoRA starts at zero and stays small). No defence is applied here.

About 2 minutes on 2 CPU cores (``--quick``: fewer examples).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import provenance, write_json  # noqa: E402

from splitft.config import DEFAULT_TASKS, cache_dir  # noqa: E402
from splitft.data.bigbench import fetch_bigbench, load_task  # noqa: E402
from splitft.models.default import default_model_dir  # noqa: E402
from splitft.models.parts import (  # noqa: E402
    WeightStore,
    client_part,
    load_model_config,
    load_tokenizer,
)

CUTS = (1, 2, 4, 8, 15)
# public text for the learned attack: BIG-bench tasks no client holds
PUBLIC = ("causal_judgment", "sports_understanding", "navigate")


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
def smashed(part, ids: list[torch.Tensor]) -> torch.Tensor:
    """The cut-layer activations of every token, one row each: (N, H)."""
    rows = []
    for seq in ids:
        x = seq[None]
        pos = torch.arange(x.shape[1])[None]
        rows.append(part.client_forward(x, torch.ones_like(x), pos)[0])
    return torch.cat(rows)


def nearest(h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Index of the embedding row closest in cosine to each row of ``h``."""
    e = torch.nn.functional.normalize(emb, dim=-1)
    out = []
    for chunk in torch.split(h, 2048):
        out.append((torch.nn.functional.normalize(chunk, dim=-1) @ e.T).argmax(-1))
    return torch.cat(out)


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """W minimising |xW - y|^2 + lam |W|^2 (features standardised by x's norm)."""
    x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    a = x.T @ x + lam * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(a, x.T @ y.double()).float()


def apply(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.cat([h, torch.ones(len(h), 1)], 1) @ w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/bench/privacy")
    ap.add_argument("--examples", type=int, default=None, help="per task")
    ap.add_argument("--ridge", type=float, default=1.0)
    args = ap.parse_args()
    per_task = args.examples or (25 if args.quick else 100)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    t0 = time.perf_counter()

    fetch_bigbench([*DEFAULT_TASKS, *PUBLIC], cache_dir())
    folder = default_model_dir()
    config, tokenizer = load_model_config(folder), load_tokenizer(folder)
    store = WeightStore(folder)
    part = client_part(store, config, 1)
    emb = part.model.get_input_embeddings().weight.detach().float()  # (V, H)
    victim_ids = token_ids(tokenizer, texts(DEFAULT_TASKS, per_task), 128)
    public_ids = token_ids(tokenizer, texts(PUBLIC, 3 * per_task), 128)
    truth = torch.cat(victim_ids)
    public_truth = torch.cat(public_ids)
    print(
        f"victims: {len(victim_ids)} examples, {len(truth)} tokens; public text: "
        f"{len(public_ids)} examples, {len(public_truth)} tokens"
    )
    rows, examples = [], {}
    for k in CUTS:
        part = client_part(store, config, k)
        h = smashed(part, victim_ids)
        guess_near = nearest(h, emb)
        w = ridge(smashed(part, public_ids), emb[public_truth], args.ridge)
        guess_lin = nearest(apply(w, h), emb)
        row = {
            "cut": k,
            "nearest": float((guess_near == truth).float().mean()),
            "linear": float((guess_lin == truth).float().mean()),
        }
        rows.append(row)
        print(f"cut {k:>2}: nearest {row['nearest']:.3f}  linear {row['linear']:.3f}")
        first = len(victim_ids[0])
        examples[k] = {
            "nearest": tokenizer.decode(guess_near[:first]),
            "linear": tokenizer.decode(guess_lin[:first]),
        }
        del part
    results = {
        **prov,
        "victim_tokens": len(truth),
        "public_tokens": len(public_truth),
        "rows": rows,
        "example_truth": tokenizer.decode(victim_ids[0]),
        "examples": examples,
        "wall_s": time.perf_counter() - t0,
    }
    write_json(out / "results.json", results)
    print(f"\n{'cut':>4} {'nearest':>8} {'linear':>8}   (share of tokens recovered)")
    for r in rows:
        print(f"{r['cut']:>4} {r['nearest']:>8.3f} {r['linear']:>8.3f}")
    print(f"\nthe client's text:  {results['example_truth']!r}")
    for k, ex in examples.items():
        print(f"cut {k:>2}, linear:   {ex['linear']!r}")
    print(f"\n{prov['command']}: {results['wall_s'] / 60:.1f} min; {out}/results.json")


if __name__ == "__main__":
    main()
