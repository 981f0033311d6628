"""Evaluation against the Hugging Face model's own logits and loss."""

import pytest
import torch
from tiny import make_tiny, make_tokenizer
from transformers import AutoModelForCausalLM

from splitft.data import collate, encode_example
from splitft.eval import (
    evaluate,
    exact_match,
    multiple_choice,
    normalize_answer,
    sequence_loglik,
)
from splitft.models.parts import WeightStore, full_part


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = make_tokenizer()
    folder = tmp_path_factory.mktemp("m") / "llama"
    config, _ = make_tiny("llama", folder, vocab_size=len(tok))
    part = full_part(WeightStore(folder), config)
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    rows = [
        encode_example(tok, p, a, 64)
        for p, a in [("What is 12 plus 7?", "19"), ("user", "assistant says 12")]
    ]
    return tok, part, ref, rows


def test_eval_loss_and_accuracy_use_shifted_labels(setup):
    tok, part, ref, rows = setup
    b = collate(rows, tok.pad_token_id)
    got = evaluate(part, rows, batch_size=2, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        out = ref(**b)
    # HF's loss shifts labels by one; it is the mean over labelled tokens
    assert got["eval_loss"] == pytest.approx(float(out.loss), abs=1e-5)
    pred, target = out.logits[:, :-1].argmax(-1), b["labels"][:, 1:]
    mask = target != -100
    assert got["eval_tokens"] == int(mask.sum())
    expected = float((pred[mask] == target[mask]).float().mean())
    assert got["eval_token_acc"] == pytest.approx(expected)


def test_sequence_loglik_matches_full_logits(setup):
    tok, part, ref, rows = setup
    got = sequence_loglik(part, rows, batch_size=1, pad_token_id=tok.pad_token_id)
    for row, ll in zip(rows, got, strict=True):
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(ref(input_ids=ids).logits[0, :-1], -1)
        target = torch.tensor(row["labels"][1:])
        keep = target != -100
        want = logp[keep].gather(-1, target[keep][:, None]).sum()
        assert ll == pytest.approx(float(want), abs=1e-4)


def test_multiple_choice_picks_the_most_likely(setup):
    tok, part, _, _ = setup
    choices = ["19", "12", "7 plus"]
    rows = [encode_example(tok, "What is 12 plus 7?", c, 64) for c in choices]
    lls = sequence_loglik(part, rows, batch_size=3, pad_token_id=tok.pad_token_id)
    best = max(range(3), key=lambda i: lls[i])
    records = [
        {"prompt": "What is 12 plus 7?", "choices": choices, "correct": best},
        {"prompt": "What is 12 plus 7?", "choices": choices, "correct": (best + 1) % 3},
    ]
    assert multiple_choice(part, tok, records, 64, batch_size=2) == [True, False]


def test_exact_match_compares_greedy_generation(setup):
    tok, part, ref, _ = setup
    from splitft.data import render_prompt

    ids = tok(
        render_prompt(tok, "What is 12 plus 7?"),
        add_special_tokens=False,
        return_tensors="pt",
    )
    with torch.no_grad():
        gen = ref.generate(
            **ids,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    text = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    records = [
        {"prompt": "What is 12 plus 7?", "answer": " " + text.upper() + "."},
        {"prompt": "What is 12 plus 7?", "answer": text + "x"},
    ]
    assert exact_match(part, tok, records, 4, batch_size=2) == [True, False]


def test_normalize_answer():
    assert normalize_answer("  Paris. ") == normalize_answer("paris")
    assert normalize_answer("19") != normalize_answer("-19")
