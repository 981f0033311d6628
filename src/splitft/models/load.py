"""What a run loads of its model before anything else: the device, the model
folder and its config, checked against the run's settings. One sequence for
the coordinator (simulated or deployed) and for a deployed client."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from splitft.config import ConfigError, FederationConfig, RunConfig
from splitft.models.default import resolve_model_dir
from splitft.models.parts import load_model_config


@dataclass
class RunModel:
    device: torch.device
    folder: Path  # a Hugging Face model folder (safetensors)
    model_config: PretrainedConfig


def load_for_run(cfg: RunConfig) -> RunModel:
    """The run's device and model (``model.*``), ``data.max_length`` checked
    against the model's context.

    Raises:
        ConfigError: a GPU that is not there, a model folder that cannot be
            read, or a max_length beyond the context.
    """
    device = resolve_device(cfg.model.device)
    folder = resolve_model_dir(cfg.model.path)
    model_config = load_model_config(folder)
    check_context(cfg, model_config)
    return RunModel(device, Path(folder), model_config)


def resolve_device(name: str) -> torch.device:
    """``model.device`` as a torch device; a GPU that is not there is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"model.device={name!r} is not allowed: 'auto', 'cpu' or 'cuda[:n]'"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(
                f"model.device={name!r} is not allowed: this machine has "
                f"{count} CUDA device(s); use 'auto' or 'cpu'"
            )
    return device


def check_context(cfg: RunConfig, model_config) -> None:
    """``data.max_length`` must fit the model's context window."""
    context = getattr(model_config, "max_position_embeddings", None)
    if context and cfg.data.max_length > context:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} is not allowed: at most "
            f"{context}, this model's context (max_position_embeddings)"
        )


def check_cuts(fed: FederationConfig, k_max: int, L: int, tail: int = 0) -> None:
    """Cuts against the model's layer count, which the config does not know."""
    if tail:
        if tail > L - 2:
            raise ConfigError(
                f"federation.tail_layers={tail} is not allowed: in [1, {L - 2}] "
                f"for this {L}-layer model (the client's first block and one on "
                "the server come before the tail)"
            )
        top = L - 1 - tail
        why = (
            f"{top} = L - 1 - federation.tail_layers: a U-shaped split leaves "
            "the server at least one block"
        )
    else:
        top, why = L, f"{L} = the whole model on the client"
    bad = [k for k in fed.cut_layers if not 1 <= k <= top]
    if fed.policy == "fixed" and bad:
        raise ConfigError(
            f"federation.cut_layers={fed.cut_layers} is not allowed: each cut must "
            f"be in [1, {top}] for this {L}-layer model ({why})"
        )
    if fed.policy != "fixed" and not fed.k_min <= k_max <= top:
        raise ConfigError(
            f"federation.k_min={fed.k_min}, federation.k_max={fed.k_max} are not "
            f"allowed: 1 <= k_min <= k_max <= {top} for this {L}-layer model ({why})"
        )
