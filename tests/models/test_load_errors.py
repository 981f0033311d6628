"""A broken model folder is one ConfigError naming the file, never a traceback."""

import json

import pytest
from tiny import make_tiny, make_tokenizer

from splitft.config import ConfigError
from splitft.models.default import resolve_model_dir
from splitft.models.parts import (
    WeightStore,
    client_part,
    load_model_config,
    load_tokenizer,
)


@pytest.fixture
def folder(tmp_path):
    make_tiny("llama", tmp_path / "llama")
    return tmp_path / "llama"


def error(call, *args) -> str:
    """The message ``call`` fails with: a ConfigError, on one line."""
    with pytest.raises(ConfigError) as err:
        call(*args)
    message = str(err.value)
    assert "\n" not in message
    return message


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def test_config_json_that_is_not_json(folder):
    path = folder / "config.json"
    path.write_text('{\n  "model_type": "llama",\n  "hidden_size": 32,,\n}\n')
    assert error(load_model_config, folder) == (
        f"{path}: line 3, column 21: not valid JSON: "
        "Expecting property name enclosed in double quotes"
    )


def test_config_json_that_is_not_utf8(folder):
    path = folder / "config.json"
    path.write_bytes(b'{"model_type": "ll\xe9ma"}')
    assert error(load_model_config, folder) == f"{path}: not UTF-8 text (byte 18)"


def test_config_json_without_model_type(folder):
    edit_config(folder, model_type=None)
    message = error(load_model_config, folder)
    assert message == f"{folder / 'config.json'}: no 'model_type' key (e.g. \"llama\")"


def test_config_json_transformers_cannot_read(folder):
    edit_config(folder, model_type="no-such-model")
    message = error(load_model_config, folder)
    assert message.startswith(
        f"{folder / 'config.json'}: not a model config transformers can read: "
    )
    assert "no-such-model" in message


def test_missing_config_json(folder):
    (folder / "config.json").unlink()
    path = folder / "config.json"
    message = error(load_model_config, folder)
    assert message == f"{path}: no such file (a model folder needs one)"
    assert error(resolve_model_dir, str(folder)).startswith(
        f"model.path={str(folder)!r}: {path} is missing; give 'default' or"
    )


def test_model_path_that_is_not_a_folder(folder):
    weights = folder / "model.safetensors"
    assert f"{str(weights)!r}: is a file, not a folder" in error(
        resolve_model_dir, str(weights)
    )
    assert "no such folder" in error(resolve_model_dir, str(folder / "nope"))


def test_folder_without_safetensors(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert error(WeightStore, folder).startswith(
        f"{folder}: no model.safetensors or model.safetensors.index.json"
    )


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # cut in half
        lambda data: data[:5],  # not even a header length
        lambda data: b"\x00garbage" * 100,
    ],
    ids=["half", "stub", "garbage"],
)
def test_truncated_or_corrupt_weights(folder, damage):
    path = folder / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    assert error(WeightStore, folder).startswith(
        f"{path}: cannot read the weights (truncated or corrupt?): "
    )


def test_truncated_shard_is_named_when_first_read(tmp_path):
    folder = tmp_path / "sharded"
    _, model = make_tiny("llama", folder)
    model.save_pretrained(folder, max_shard_size="60KB")  # beside model.safetensors
    (folder / "model.safetensors").unlink()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = folder / index["weight_map"]["model.embed_tokens.weight"]
    first.write_bytes(first.read_bytes()[:100])
    store = WeightStore(folder)  # shards are opened lazily
    message = error(client_part, store, load_model_config(folder), 1)
    assert message.startswith(f"{first}: cannot read the weights")


def test_index_that_is_not_json(tmp_path):
    folder = tmp_path / "sharded"
    _, model = make_tiny("llama", folder)
    index = folder / "model.safetensors.index.json"
    index.write_text('{"weight_map": {\n "a": b}}')
    assert error(WeightStore, folder) == (
        f"{index}: line 2, column 7: not valid JSON: Expecting value"
    )


@pytest.mark.parametrize("base", ["float32", "nf4"])  # nf4: quantized at load
def test_weights_that_do_not_match_the_config(folder, base):
    edit_config(folder, num_hidden_layers=5)
    store = WeightStore.for_base(folder, base)
    config = load_model_config(folder)
    message = error(client_part, store, config, 5)
    assert message.startswith(f"{folder}: the weights have no 'model.layers.4.")


@pytest.mark.parametrize("base", ["float32", "nf4"])
def test_weights_of_another_size_than_the_config(folder, base):
    config = json.loads((folder / "config.json").read_text())
    edit_config(folder, intermediate_size=config["intermediate_size"] * 2)
    store = WeightStore.for_base(folder, base)
    config = load_model_config(folder)
    message = error(client_part, store, config, 1)
    assert message.startswith(f"{folder}: 'model.layers.0.mlp.")
    assert message.endswith("(weights and config do not match)")


def test_folder_without_a_tokenizer(folder):
    message = error(load_tokenizer, folder)
    assert message.startswith(f"{folder}: no tokenizer transformers can load")


def test_tokenizer_json_that_is_not_json(folder):
    make_tokenizer().save_pretrained(folder)
    assert load_tokenizer(folder).eos_token == "<|im_end|>"
    path = folder / "tokenizer.json"
    path.write_text(path.read_text()[:200])
    assert error(load_tokenizer, folder).startswith(f"{path}: line ")
