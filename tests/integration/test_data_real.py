"""Data features on the real default tokenizer and BIG-bench tasks."""

import json

import pytest

from splitft.cli import main
from splitft.config import load_config
from splitft.data.federated import load_run_data


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from splitft.models.default import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.mark.integration
def test_length_dirichlet_partition_of_bigbench(tokenizer, tmp_path, capsys):
    overrides = [
        "partition.method=length_dirichlet",
        "partition.alpha=0.1",
        "federation.num_clients=5",
        "data.max_train_per_task=100",
    ]
    data = load_run_data(load_config(None, overrides), tokenizer)
    sizes = [len(p) for p in data.partitions]
    assert min(sizes) >= 4 and sum(sizes) <= len(data.train)
    means = [sum(p["length"]) / len(p) for p in data.partitions]
    assert max(means) - min(means) > 5  # tokens: clients see different lengths
    assert main(["partition", *overrides, f"out_dir={tmp_path}", "name=p"]) == 0
    assert "length_dirichlet partition" in capsys.readouterr().out
    assert (tmp_path / "p" / "partitions.png").stat().st_size > 10_000


@pytest.mark.integration
def test_local_alpaca_and_chat_files_with_the_real_template(tokenizer, tmp_path):
    alpaca = tmp_path / "alpaca.jsonl"
    rows = [
        {"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)}
        for i in range(20)
    ]
    alpaca.write_text("\n".join(json.dumps(r) for r in rows))
    chat = tmp_path / "chat.json"
    chat.write_text(
        json.dumps(
            [
                {
                    "messages": [
                        {"role": "user", "content": f"Say {i}."},
                        {"role": "assistant", "content": str(i)},
                    ]
                }
                for i in range(20)
            ]
        )
    )
    for path in (alpaca, chat):
        cfg = load_config(
            None,
            [f"data.source={path}", "data.eval_size=4", "federation.num_clients=2"],
        )
        data = load_run_data(cfg, tokenizer)
        assert len(data.held_out) == 4 and len(data.train) == 16
        row = data.train[0]
        answer = [
            t
            for t, label in zip(row["input_ids"], row["labels"], strict=True)
            if label != -100
        ]
        text = tokenizer.decode(answer)
        assert text.strip().startswith(row["answer"]) and "<|im_end|>" in text
        assert "<|im_start|>user" in tokenizer.decode(row["input_ids"])
