"""LoRA through PEFT with a per-layer rank map, keyed by global module names.

Adapter state dicts use the module path of the unsplit model without PEFT's
adapter name, e.g. ``model.layers.17.self_attn.q_proj.lora_A.weight``: the
key names the global layer, so the same layer's adapter is found on the client
of one participant and on the server side of another, and prefixing
``base_model.model.`` gives PEFT's own checkpoint key.

Ranks: every layer gets ``r`` except the client's last block, which gets
``cut_rank``. ``alpha`` is scaled with the rank (``alpha * rank / r``) so the
LoRA scale ``alpha / rank`` is the same everywhere and a rank-``c`` adapter is
exactly the first ``c`` components of a rank-``r`` one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import peft
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from splitft.config import LoraSettings
from splitft.models.arch import ArchSpec, spec_for

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"\.lora_([AB])\.([^.]+)\.weight$")


def target_modules(spec: ArchSpec, settings: LoraSettings) -> list[str]:
    return list(settings.target_modules or spec.target_modules)


def layer_ranks(layers: range, settings: LoraSettings, cut: bool) -> dict[int, int]:
    """Rank of each held layer; with ``cut`` the last one gets ``cut_rank``."""
    ranks = {i: settings.r for i in layers}
    if cut and len(layers):
        ranks[layers[-1]] = settings.cut_rank
    return ranks


def client_layer_ranks(
    k: int, num_layers: int, settings: LoraSettings, tail: int = 0
) -> dict[int, int]:
    """Ranks of a client with cut ``k``: its last block at ``cut_rank``.

    A client with ``k == num_layers`` holds the whole model and sends no
    activations, so it has no cut layer and every block keeps rank ``r``. A
    U-shaped client also holds the last ``tail`` blocks, at rank ``r``.
    """
    ranks = layer_ranks(range(k), settings, cut=k < num_layers)
    if k < num_layers:
        ranks.update(layer_ranks(tail_range(num_layers, tail), settings, cut=False))
    return ranks


def tail_range(num_layers: int, tail: int) -> range:
    """The blocks a U-shaped client runs after the server (none: ``tail`` 0)."""
    return range(num_layers - tail, num_layers) if tail else range(0)


def client_key_ranks(
    keys: Iterable[str],
    spec: ArchSpec,
    k: int,
    num_layers: int,
    settings: LoraSettings,
    tail: int = 0,
) -> dict[str, int]:
    """Rank of each adapter key a client with cut ``k`` (and ``tail``) holds."""
    held = client_layer_ranks(k, num_layers, settings, tail)
    return {
        key: held[layer_of(key, spec)] for key in keys if layer_of(key, spec) in held
    }


def peft_config(
    spec: ArchSpec, settings: LoraSettings, ranks: Mapping[int, int] | None = None
) -> peft.LoraConfig:
    """A PEFT config adapting exactly the layers in ``ranks`` at those ranks, or
    every layer at rank ``settings.r`` when ``ranks`` is None."""
    odd = {i: rk for i, rk in (ranks or {}).items() if rk != settings.r}
    pattern = {rf"{spec.blocks}\.{i}\..*": rk for i, rk in odd.items()}
    return peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules(spec, settings),
        # PEFT 0.18 refuses a layers_pattern with no layers to transform
        layers_to_transform=None if ranks is None else sorted(ranks),
        layers_pattern=None if ranks is None else spec.blocks,
        rank_pattern=pattern,
        alpha_pattern={
            p: settings.alpha * rk / settings.r for p, rk in pattern.items()
        },
        fan_in_fan_out=spec.fan_in_fan_out,
        bias="none",
    )


def inject(
    model: nn.Module,
    spec: ArchSpec,
    settings: LoraSettings,
    ranks: Mapping[int, int],
    adapter: str = "default",
) -> None:
    """Add a LoRA adapter named ``adapter`` to ``model`` in place (PEFT).

    Its weights are float32 whatever the frozen base's precision (PEFT makes
    them in the base layer's dtype; ``PeftModel`` upcasts them, as
    ``autocast_adapter_dtype`` does): a bfloat16 base trains fp32 adapters,
    and PEFT's forward computes them in fp32 and casts the result back.
    """
    peft.inject_adapter_in_model(peft_config(spec, settings, ranks), model, adapter)
    for p in _lora_params(model, adapter).values():
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def _lora_params(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    out = {}
    for name, p in model.named_parameters():
        m = _LORA_KEY.search(name)
        if m and m.group(2) == adapter:
            out[name[: m.start()] + f".lora_{m.group(1)}.weight"] = p
    return out


def adapter_params(model: nn.Module, adapter: str = "default") -> list[nn.Parameter]:
    return list(_lora_params(model, adapter).values())


def adapter_state(
    model: nn.Module, adapter: str = "default"
) -> dict[str, torch.Tensor]:
    """A detached copy of the adapter's LoRA weights, keyed by global names."""
    return {k: p.detach().clone() for k, p in _lora_params(model, adapter).items()}


def load_adapter_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], adapter: str = "default"
) -> None:
    """Copy ``state`` into the adapter; keys must match exactly, shapes too."""
    params = _lora_params(model, adapter)
    missing, extra = set(params) - set(state), set(state) - set(params)
    if missing or extra:
        raise KeyError(
            f"adapter {adapter!r}: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]}"
        )
    with torch.no_grad():
        for key, p in params.items():
            if p.shape != state[key].shape:
                raise ValueError(
                    f"{key}: shape {tuple(state[key].shape)} != {tuple(p.shape)}"
                )
            p.copy_(state[key])


def layer_of(key: str, spec: ArchSpec) -> int:
    """The global layer index in an adapter key."""
    m = re.search(rf"(?:^|\.){spec.blocks}\.(\d+)\.", key)
    if m is None:
        raise ValueError(f"{key!r} names no {spec.blocks}.<i> block")
    return int(m.group(1))


def _adapted_modules(config: PretrainedConfig, settings: LoraSettings):
    """(name, in_features, out_features) of every module LoRA adapts."""
    spec = spec_for(config.model_type)
    targets = target_modules(spec, settings)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    prefix = f"{spec.base}.{spec.blocks}."
    for name, module in skeleton.named_modules():
        if not name.startswith(prefix) or name.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(module, nn.Linear):
            yield name, module.in_features, module.out_features
        elif hasattr(module, "nf"):  # transformers' Conv1D: weight is (in, out)
            yield name, module.weight.shape[0], module.weight.shape[1]


def init_global_adapter(
    config: PretrainedConfig, settings: LoraSettings, seed: int
) -> dict[str, torch.Tensor]:
    """Rank-``r`` adapters for every layer, initialised as PEFT does.

    A is Kaiming-uniform (a=sqrt(5)), B is zero, so the model starts unchanged.
    Built once by the server and sent to every holder, so all copies of a
    layer start from the same A.
    """
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, fan_in, fan_out in _adapted_modules(config, settings):
        a = torch.empty(settings.r, fan_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        state[f"{name}.lora_A.weight"] = a
        state[f"{name}.lora_B.weight"] = torch.zeros(fan_out, settings.r)
    if not state:
        raise ValueError(f"lora.target_modules {settings.target_modules} match nothing")
    return state


def export_peft(
    state: Mapping[str, torch.Tensor],
    config: PretrainedConfig,
    settings: LoraSettings,
    folder: Path,
    base_model: str,
) -> Path:
    """Write ``state`` as a PEFT adapter loadable by ``PeftModel.from_pretrained``."""
    spec = spec_for(config.model_type)
    folder.mkdir(parents=True, exist_ok=True)
    # one rank everywhere: the global adapter holds every layer at rank r
    cfg = peft_config(spec, settings)
    cfg.task_type, cfg.base_model_name_or_path = "CAUSAL_LM", base_model
    cfg.save_pretrained(str(folder))
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(
        tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    return folder


def select_layers(
    state: Mapping[str, torch.Tensor], spec: ArchSpec, layers: Iterable[int]
) -> dict[str, torch.Tensor]:
    """The entries of ``state`` that belong to ``layers``."""
    wanted = set(layers)
    return {k: v for k, v in state.items() if layer_of(k, spec) in wanted}
