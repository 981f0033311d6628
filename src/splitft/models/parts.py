"""Cut a causal LM into a client part and a server part.

Both parts are the model's own Hugging Face class built on the meta device,
with the blocks a side does not hold replaced by ``PassThrough`` and only the
tensors it needs read from safetensors. Module names therefore keep their
global layer index (``model.layers.17.self_attn.q_proj``) on both sides, and
the decoder's own ``forward`` rebuilds the causal mask and rotary embeddings
from what the client sends.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from splitft.config import ConfigError
from splitft.models.arch import ArchSpec, PassThrough, ZeroPositions, spec_for
from splitft.models.quantize import (
    QUANTIZED,
    compute_dtype,
    is_linear,
    mark_quantized,
    quantize_linear,
)


class WeightStore:
    """Reads a model folder's safetensors lazily, each tensor at most once.

    Parts built from one store share its (frozen) tensors, so a simulation of
    many clients holds the base weights once.

    Raises:
        ConfigError: no safetensors weights, a bad index, or a truncated or
            corrupt weights file (when the store is built, or for a sharded
            model when a shard is first read); names the file.
    """

    def __init__(
        self,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        quantize: str | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.dtype, self.device = dtype, torch.device(device)
        # "int8" / "nf4": the blocks' linear layers are quantized when a part
        # first needs them (:meth:`linear`), the rest is in ``dtype``
        if quantize is not None and quantize not in QUANTIZED:
            raise ValueError(f"quantize={quantize!r} not in {QUANTIZED}")
        self.quantize = quantize
        self._layers: dict[str, nn.Module] = {}
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            data = _read_json(index)
            self._files = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(self._files, dict):
                raise ConfigError(f"{index}: no 'weight_map' object")
        else:
            single = self.folder / "model.safetensors"
            if not single.exists():
                raise ConfigError(
                    f"{self.folder}: no model.safetensors or "
                    "model.safetensors.index.json; SplitFT reads safetensors weights "
                    "only (save_pretrained writes them)"
                )
            with _safe_open(single) as f:
                self._files = {k: single.name for k in f.keys()}
        self._cache: dict[str, torch.Tensor] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._files

    @classmethod
    def for_base(cls, folder: str | Path, base: str, device="cpu") -> WeightStore:
        """A store of the frozen base in ``client.base_dtype=base``
        (:mod:`splitft.models.quantize`)."""
        quantize = base if base in QUANTIZED else None
        return cls(folder, dtype=compute_dtype(base), device=device, quantize=quantize)

    @property
    def base(self) -> str:
        """The format as ``client.base_dtype`` names it."""
        return self.quantize or str(self.dtype).removeprefix("torch.")

    def get(self, key: str) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = self._read(key)
        return self._cache[key]

    def shape(self, key: str) -> list[int]:
        """``key``'s shape as stored (read from the file's header)."""
        if key in self._cache:
            return list(self._cache[key].shape)
        with _safe_open(self.folder / self._files[key]) as f:
            return list(f.get_slice(key).get_shape())

    def _read(self, key: str) -> torch.Tensor:
        path = self.folder / self._files[key]
        with _safe_open(path) as f:
            t = f.get_tensor(key)  # mapped from the file, not yet read
        if not t.is_floating_point() or t.dtype == self.dtype:
            return t.to(self.device)
        if t.dim() == 0 or t.nbytes <= _CHUNK_BYTES:
            return t.to(self.dtype).to(self.device)
        # another dtype, a large tensor (an embedding): converted a chunk of
        # rows at a time, each read through its own mapping, so the process
        # never holds the whole source beside its conversion (113 MB of
        # SmolLM2's float32 embedding beside its 57 MB in bfloat16)
        out = torch.empty(t.shape, dtype=self.dtype, device=self.device)
        rows = max(1, _CHUNK_BYTES * t.shape[0] // t.nbytes)
        del t
        for i in range(0, out.shape[0], rows):
            with _safe_open(path) as f:
                out[i : i + rows] = f.get_slice(key)[i : i + rows]
        return out

    def linear(self, prefix: str, transposed: bool = False) -> nn.Module:
        """The frozen quantized layer whose weight is ``prefix + "weight"``
        (``transposed``: stored ``(in, out)``, as GPT-2's Conv1D holds it),
        quantized on first use and shared by every part built from this
        store; the full-precision weight is not kept."""
        if prefix not in self._layers:
            assert self.quantize is not None
            weight = self._read(prefix + "weight")
            weight = weight.t() if transposed else weight  # (out, in)
            bias = prefix + "bias"
            bias = self._read(bias) if bias in self else None
            self._layers[prefix] = quantize_linear(weight, bias, self.quantize)
        return self._layers[prefix]


_CHUNK_BYTES = 8 << 20  # what a dtype conversion at load reads at a time


def _safe_open(path: Path):
    """``safe_open``, which checks the header against the file's size: a
    truncated or corrupt file is one ConfigError naming it."""
    try:
        return safe_open(path, "pt")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (SafetensorError, OSError) as err:
        raise ConfigError(
            f"{path}: cannot read the weights (truncated or corrupt?): {err}"
        ) from None


def _read_json(path: Path) -> Any:
    """A JSON file's contents; unreadable, non-UTF-8 or invalid JSON is one
    ConfigError naming the file (and the line and column)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise ConfigError(f"{path}: {where}: not valid JSON: {e.msg}") from None


def load_model_config(folder: str | Path) -> PretrainedConfig:
    """The folder's Hugging Face config, with the KV cache off.

    Raises:
        ConfigError: ``config.json`` is missing, not JSON (names the line) or
            not a config transformers knows; names the file.
    """
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # transformers raises many types for a bad config
        raise _config_error(Path(folder) / "config.json", err) from None
    config.use_cache = False
    return config


def _config_error(path: Path, err: Exception) -> ConfigError:
    """Why transformers could not read ``path``, in one line naming it."""
    if not path.is_file():
        return ConfigError(f"{path}: no such file (a model folder needs one)")
    data = _read_json(path)  # raises for the line and column of a JSON error
    if not isinstance(data, dict):
        return ConfigError(f"{path}: not a JSON object")
    if not isinstance(data.get("model_type"), str):
        return ConfigError(f"{path}: no 'model_type' key (e.g. \"llama\")")
    why = _first_paragraph(err)
    return ConfigError(f"{path}: not a model config transformers can read: {why}")


def _first_paragraph(err: Exception) -> str:
    """transformers' error messages, cut to their first paragraph, one line."""
    return " ".join(str(err).split("\n\n")[0].split())


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer (offline).

    Raises:
        ConfigError: it has none transformers can load, or a tokenizer file
            is not valid JSON (names the file and the line).
    """
    folder = Path(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # as for the config: many types
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                _read_json(folder / name)  # raises for a JSON error, naming it
        why = _first_paragraph(err)
        raise ConfigError(
            f"{folder}: no tokenizer transformers can load (a model folder needs "
            f"tokenizer.json and tokenizer_config.json): {why}"
        ) from None


@dataclass
class TrainLoss:
    """What a training forward through the head gives.

    Attributes:
        loss: the mean cross-entropy over the labelled tokens (the HF loss),
            None when no token is labelled.
        tokens: how many tokens are labelled.
        correct: how many of them the head's argmax predicts.
    """

    loss: torch.Tensor | None
    tokens: int
    correct: int


class ModelPart:
    """One side of the cut: the HF model with only this side's pieces real.

    Attributes:
        model: the causal LM (PEFT injects LoRA into it in place).
        layers: the global indices of the blocks this part holds.
    """

    def __init__(
        self,
        store: WeightStore,
        model_config: PretrainedConfig,
        layers: range,
        *,
        embed: bool,
        head: bool,
    ) -> None:
        self.spec: ArchSpec = spec_for(model_config.model_type)
        self.model_config = copy.deepcopy(model_config)
        self.layers, self.has_embed, self.has_head = layers, embed, head
        num_layers = self.model_config.num_hidden_layers
        if not (0 <= layers.start <= layers.stop <= num_layers):
            raise ValueError(f"layers {layers} outside the model's [0, {num_layers})")
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.model_config)
        self._strip()
        if store.quantize:
            self._quantize(store)
        self._load(store)
        self.model.requires_grad_(False)
        self.model.eval()  # training code calls .train(), as PEFT training does
        self._blocks = getattr(self.decoder, self.spec.blocks)

    @property
    def decoder(self) -> nn.Module:
        return getattr(self.model, self.spec.base)

    def _strip(self) -> None:
        spec, dec = self.spec, self.decoder
        blocks = getattr(dec, spec.blocks)
        for i in range(len(blocks)):
            if i not in self.layers:
                blocks[i] = PassThrough()
        if not self.has_embed:
            for name in spec.embeddings:  # PEFT inspects them: keep an empty module
                setattr(dec, name, PassThrough())
            for name, kind in spec.server_neutral.items():
                neutral = ZeroPositions(self.model_config.hidden_size)
                setattr(
                    dec, name, neutral if kind == "zero_positions" else nn.Identity()
                )
        if not self.has_head:
            setattr(dec, spec.final_norm, nn.Identity())
            setattr(self.model, spec.head, PassThrough())

    def _quantize(self, store: WeightStore) -> None:
        """Put the store's quantized layers in place of the held blocks'
        linear layers (the embeddings, norms and a head stay unquantized)."""
        blocks = getattr(self.decoder, self.spec.blocks)
        for i in self.layers:
            prefix = self.spec.block_prefix(i)
            for name, module in list(blocks[i].named_modules()):
                if not is_linear(module):
                    continue
                parent, _, attr = name.rpartition(".")
                owner = blocks[i].get_submodule(parent) if parent else blocks[i]
                key = f"{prefix}{name}.weight"
                _check_shape(store, key, module.weight.shape, header=True)
                transposed = not isinstance(module, nn.Linear)  # Conv1D
                setattr(owner, attr, store.linear(f"{prefix}{name}.", transposed))
        mark_quantized(self.model, store.quantize)

    def _load(self, store: WeightStore) -> None:
        head_key = f"{self.spec.head}.weight"
        tensors = {}
        for key, want in self.model.state_dict().items():
            if not want.is_meta:  # a quantized layer, already in place
                continue
            source = key
            if (
                key not in store
                and key == head_key
                and self.model_config.tie_word_embeddings
            ):
                source = self.spec.tied_source  # tied head: a frozen copy
            _check_shape(store, source, want.shape)
            tensors[key] = store.get(source)
        # strict for every unquantized tensor: the still-meta check below
        self.model.load_state_dict(tensors, strict=False, assign=True)
        for name in self.spec.rebuild:  # non-persistent buffers, e.g. RoPE inv_freq
            module = getattr(self.decoder, name)
            with torch.device(store.device):
                setattr(self.decoder, name, type(module)(config=self.model_config))
        still_meta = [n for n, t in self.model.state_dict().items() if t.is_meta]
        if still_meta:
            raise RuntimeError(f"tensors left unloaded: {still_meta[:5]}")

    def checkpoint_blocks(self, on: bool = True) -> None:
        """Activation checkpointing of the held blocks (``client.checkpointing``):
        each keeps only its input for the backward pass and runs its forward
        again there. The same module tree (PEFT's names do not move): only
        each block's ``forward`` is wrapped."""
        for i in self.layers:
            block = self._blocks[i]
            if on and "forward" not in vars(block):
                block.forward = _checkpointed(block.forward)
            elif not on and "forward" in vars(block):
                del block.forward

    @contextlib.contextmanager
    def cut_at(self, k: int) -> Iterator[None]:
        """Run only blocks ``[k, ...)`` of this part while inside the block."""
        if k not in self.layers and k != self.layers.stop:
            raise ValueError(f"cut {k} outside the blocks held {self.layers}")
        view = nn.ModuleList(
            [PassThrough() if i < k else b for i, b in enumerate(self._blocks)]
        )
        setattr(self.decoder, self.spec.blocks, view)
        try:
            yield
        finally:
            setattr(self.decoder, self.spec.blocks, self._blocks)

    def client_forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor,  # (B, T)
    ) -> torch.Tensor:
        """Embeddings and the held blocks: the smashed data ``(B, T, H)``."""
        return self._blocks_out(attention_mask, position_ids, input_ids=input_ids)

    def middle_forward(
        self,
        hidden: torch.Tensor,  # (B, T, H) smashed data at the first cut
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        """The held blocks only (no head): the hidden state after the last
        one, ``(B, T, H)``. The server's part of a U-shaped split."""
        return self._blocks_out(attention_mask, position_ids, inputs_embeds=hidden)

    def _blocks_out(self, attention_mask, position_ids, **inputs) -> torch.Tensor:
        out = self.decoder(
            **inputs,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    def train_loss(
        self,
        labels: torch.Tensor,  # (B, T), -100 where there is no loss
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        *,
        hidden: torch.Tensor | None = None,  # (B, T, H) at this part's first block
        input_ids: torch.Tensor | None = None,  # (B, T), a part with embeddings
    ) -> TrainLoss:
        """The held blocks and the final norm at every position, then the head
        and the cross-entropy at the labelled positions only.

        Position t predicts the label at t + 1, as in the HF loss; only the
        positions whose next label is not -100 reach the head, so the
        ``(B, T, V)`` logits of the full head are never made. The loss, its
        gradients and the accuracy are those of the HF model's own loss.
        """
        inputs = (
            {"input_ids": input_ids} if hidden is None else {"inputs_embeds": hidden}
        )
        final = self._blocks_out(attention_mask, position_ids, **inputs)  # (B, T, H)
        logits, wanted, _ = self.head_at_labels(final, labels)  # (N, V), (N,)
        if len(wanted) == 0:
            return TrainLoss(None, 0, 0)
        correct = int((logits.detach().argmax(-1) == wanted).sum())
        return TrainLoss(F.cross_entropy(logits, wanted), len(wanted), correct)

    def head_at_labels(
        self,
        final: torch.Tensor,  # (B, T, H) after the final norm
        labels: torch.Tensor,  # (B, T), -100 where there is no loss
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The head at the N positions whose next token has a label only:
        the logits ``(N, V)`` in float32 (as the HF loss upcasts them), their
        targets ``(N,)`` and the ``(B, T-1)`` mask that chose them."""
        target = labels[:, 1:]  # (B, T-1): position t predicts label t + 1
        mask = target != -100
        head = getattr(self.model, self.spec.head)
        return head(final[:, :-1][mask]).float(), target[mask], mask

    def logits_from_hidden(
        self,
        hidden: torch.Tensor,  # (B, T, H) smashed data
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
    ):
        """Remaining blocks, final norm and head at every position (the logits
        ``(B, T, V)``); the HF loss when labels are given. Training uses
        :meth:`train_loss`, which runs the head only where labels are."""
        return self.model(
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=False,
        )

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def _check_shape(store: WeightStore, source: str, want, header: bool = False) -> None:
    """The weights must hold ``source`` with the shape ``want`` the config
    gives it (``header``: read from the file's header, not loaded); a
    ConfigError naming both if not."""
    if source not in store:
        raise ConfigError(
            f"{store.folder}: the weights have no {source!r}, which "
            "config.json needs (weights and config do not match)"
        )
    shape = store.shape(source) if header else list(store.get(source).shape)
    if shape != list(want):
        raise ConfigError(
            f"{store.folder}: {source!r} has shape {shape}, but config.json "
            f"makes it {list(want)} (weights and config do not match)"
        )


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` under non-reentrant activation checkpointing while autograd
    records (it saves the inputs; dropout's RNG state is replayed)."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(
            forward, *args, use_reentrant=False, **kwargs
        )

    return run


def client_part(
    store: WeightStore, model_config: PretrainedConfig, k: int
) -> ModelPart:
    """Token embeddings and blocks ``[0, k)``; with ``k == L`` the head too.

    A client holding every block trains the whole model locally (FedAvg): it
    needs the final norm and the head to compute its own loss.
    """
    L = model_config.num_hidden_layers
    return ModelPart(store, model_config, range(0, k), embed=True, head=k == L)


def labelled_tokens(labels: torch.Tensor) -> int:
    """The positions whose next token has a label (``labels`` ``(B, T)``,
    -100 where none): where the head and the loss run in training."""
    return int((labels[:, 1:] != -100).sum())


def loss_share(tokens: int, step_tokens: int, num_micro: int) -> float:
    """What a micro-batch's mean loss weighs in its step: its share of the
    step's labelled tokens, as unsplit training on the whole batch weighs it
    (``step_tokens`` 0: each micro-batch equally)."""
    return tokens / step_tokens if step_tokens > 0 else 1 / num_micro


def server_part(
    store: WeightStore, model_config: PretrainedConfig, k: int
) -> ModelPart:
    """Blocks ``[k, L)``, final norm and LM head."""
    L = model_config.num_hidden_layers
    return ModelPart(store, model_config, range(k, L), embed=False, head=True)


def middle_part(
    store: WeightStore, model_config: PretrainedConfig, k: int, end: int
) -> ModelPart:
    """Blocks ``[k, end)`` alone: the server's part of a U-shaped split, where
    the client keeps blocks ``[end, L)``, the final norm and the head (a
    :func:`server_part` at ``end``), and with them the labels."""
    L = model_config.num_hidden_layers
    if not 1 <= k < end < L:
        raise ValueError(
            f"a U-shaped split needs 1 <= k < end < L={L}: k={k}, end={end}"
        )
    return ModelPart(store, model_config, range(k, end), embed=False, head=False)


def full_part(store: WeightStore, model_config: PretrainedConfig) -> ModelPart:
    """The whole model (used to evaluate and export the global adapter)."""
    L = model_config.num_hidden_layers
    return ModelPart(store, model_config, range(0, L), embed=True, head=True)
