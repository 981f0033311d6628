"""Tiny randomly initialised models built from a config, one per architecture."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY, tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(**TINY, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**TINY, tie_word_embeddings=False),
    "gpt2": lambda: GPT2Config(
        vocab_size=97,
        n_embd=32,
        n_layer=4,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
}
ARCHS = sorted(CONFIGS)


def make_tiny(arch: str, folder, seed: int = 0, vocab_size: int | None = None):
    """Save a random tiny model of ``arch`` to ``folder``; return (config, model)."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    if vocab_size is not None:
        config.vocab_size = vocab_size
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    return model.config, model


def batch(vocab: int = 97, B: int = 2, T: int = 10, seed: int = 1):
    """A right-padded batch with labels masked on the prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, T - 3 :] = 0
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[attention_mask == 0] = -100
    position_ids = torch.arange(T).expand(B, T).clone()
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        labels=labels,
    )


def token_rows(n: int = 8, T: int = 12, seed: int = 0) -> list[dict]:
    """Tokenised training rows of random ids, the first 4 tokens unlabelled."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 97, (T,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    return rows


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
END_OF_TURN = "<|im_end|>\n"


def make_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """Byte-level BPE, so any text round-trips through decode."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["What is 12 plus 7? 19", "user assistant"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
    )


# the columns build_datasets documents
COLUMNS = {
    "input_ids",
    "labels",
    "task",
    "prompt",
    "answer",
    "length",
    "choices",
    "correct",
}
