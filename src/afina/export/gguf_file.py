"""GGUF for llama.cpp, Ollama and LM Studio: written with the `gguf` package (llama.cpp's own writer
and tensor names), quantized by it (q8_0) or by llama.cpp itself (k-quants), read back by llama.cpp.

    write_gguf(merged, tokenizer, path, "q8_0")
    report = check_gguf_file(path, reference, conversations, max_new_tokens, eos, tokenizer)

Llama, Mistral and Qwen2 architectures, written as llama.cpp's own converter writes them: the weights
renamed to llama.cpp's names (the `gguf` package's tensor-name maps); Llama and Mistral as
llama.cpp's `llama` architecture, with q and k permuted to its rotary layout (Mistral's sliding
window is not written: llama.cpp attends to the whole context, as for its own conversions); Qwen2 as
`qwen2`, whose rotary layout is Hugging Face's, with its q/k/v biases. The tokenizer goes in as a
GPT-2 style BPE vocabulary with its merges, pre-tokenizer, special tokens and chat template, so that
no runtime needs anything but the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from afina.errors import AfinaError
from afina.export.roundtrip import (
    Answer,
    RoundTrip,
    check_stop_token,
    check_stops,
    compare_answers,
    mismatch,
)
from afina.models.loading import read_gguf_metadata

WRITTEN_BY_GGUF = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
"""Quantizations the gguf package writes itself; any other llama.cpp file type goes through llama.cpp."""
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
"""Hugging Face model type -> llama.cpp architecture."""
ROTARY_PERMUTED = ("llama",)
"""llama.cpp architectures that rotate adjacent pairs (Hugging Face rotates the two halves of a head)."""
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    # llama.cpp's name for a byte-level BPE pre-tokenizer (it ships the regular expressions), from the
    # steps of tokenizer.json's pre_tokenizer (`pre_tokenizer_steps`)
    ("ByteLevel",): "gpt-2",
    ("Digits", "ByteLevel"): "smollm",
    (f"Split {LLAMA3_SPLIT}", "ByteLevel without regex"): "llama-bpe",
    (f"Split {QWEN2_SPLIT}", "ByteLevel without regex"): "qwen2",
}


def llama_cpp_module():
    """llama-cpp-python, or None where it is not installed (a source build of llama.cpp)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def check_quant(quant: str, verify: bool) -> None:
    """Refuse, before any work, a quantization no installed tool writes, and a round trip without llama.cpp."""
    llama_cpp = llama_cpp_module()
    if quant not in WRITTEN_BY_GGUF:
        if llama_cpp is None:
            raise AfinaError("runtime_missing", f"{quant} is written by llama.cpp's quantizer, which is not installed",
                             location="--quant", hint="pip install llama-cpp-python, or use --quant q8_0 or f16")
        if not hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}"):
            known = sorted(n.removeprefix("LLAMA_FTYPE_MOSTLY_").lower() for n in dir(llama_cpp)
                           if n.startswith("LLAMA_FTYPE_MOSTLY_"))
            raise AfinaError("bad_option", f"unknown quantization {quant!r}", location="--quant",
                             hint=f"one of {', '.join(known)}")
    if verify and llama_cpp is None:
        raise AfinaError("runtime_missing", "the round trip loads the GGUF in llama.cpp, which is not installed",
                         location="--format gguf", hint="pip install llama-cpp-python, or export with --no-verify "
                                                        "(the model card then says the export was not checked)")


def check_architecture(model_name: str) -> None:
    from afina.models.loading import model_config

    model_type = model_config(model_name).model_type
    if model_type not in ARCHITECTURES:
        raise AfinaError("export_unsupported", f"GGUF export supports {', '.join(ARCHITECTURES)} models, not "
                         f"{model_type}", location="model", hint="export --format safetensors, and convert it with "
                                                                 "llama.cpp's convert_hf_to_gguf.py")


def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face Llama rotates the two halves of each head; llama.cpp rotates adjacent pairs. Reorder
    the rows of q_proj / k_proj so that llama.cpp's rotary embedding meets the same numbers (as
    llama.cpp's convert_hf_to_gguf.py does)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, quant: str) -> Path:
    """Write `model` (merged; Llama, Mistral or Qwen2) and `tokenizer` to `path` in `quant`."""
    if quant not in WRITTEN_BY_GGUF:
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            f16 = write_gguf(model, tokenizer, Path(scratch) / "f16.gguf", "f16")
            quantize_with_llama_cpp(f16, path, quant)
        return path
    import gguf

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default",
                                                        "rope_theta": getattr(config, "rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise AfinaError("export_unsupported", f"rope scaling {rope['rope_type']!r} is not exported to GGUF yet",
                         location="model", hint="export --format safetensors")
    arch = ARCHITECTURES[config.model_type]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(model.name_or_path.rstrip("/").split("/")[-1] or "afina-export")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, WRITTEN_BY_GGUF[quant]))
    add_tokenizer(writer, tokenizer, config.vocab_size)
    add_tensors(writer, model, arch, quant, heads, kv_heads)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_tensors(writer, model: PreTrainedModel, arch: str, quant: str, heads: int, kv_heads: int) -> None:
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)
    permute = arch in ROTARY_PERMUTED
    tied = model.config.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        if "rotary_emb" in name or (tied and name == "lm_head.weight"):
            continue  # llama.cpp computes rotary tables, and reads a missing output.weight as tied
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise AfinaError("export_unsupported", f"no llama.cpp name for the weight {name}", location="model",
                             hint="export --format safetensors")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if permute and ".q_proj." in name:  # weight, and bias where the model has one
            data = permute_rotary(data, heads)
        elif permute and ".k_proj." in name:
            data = permute_rotary(data, kv_heads)
        add_tensor(writer, target, data, quant)


def add_tensor(writer, name: str, data: np.ndarray, quant: str) -> None:
    """Norms and other vectors stay f32 (as llama.cpp keeps them); matrices take `quant` where their
    rows fit its blocks, else f16."""
    import gguf

    if data.ndim == 1 or quant == "f32":
        writer.add_tensor(name, data.astype(np.float32))
        return
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if qtype == gguf.GGMLQuantizationType.F16 or data.shape[-1] % block:
        writer.add_tensor(name, data.astype(np.float16))
        return
    writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def add_tokenizer(writer, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """A GPT-2 style BPE tokenizer: tokens, types, merges, pre-tokenizer, special ids, chat template."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    if spec.get("model", {}).get("type") != "BPE":
        raise AfinaError("export_unsupported", "GGUF export supports byte-level BPE tokenizers (Llama 3, SmolLM, "
                         "GPT-2 style) only", location="tokenizer", hint="export --format safetensors")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding matrix is larger than the vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.NORMAL if i not in added else
                     gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id)):
        if token_id is not None and token_id < vocab_size:  # not one the tokenizer adds beyond the model's vocabulary
            add(token_id)
    writer.add_add_bos_token(False)  # the chat template writes every special token the prompt needs
    writer.add_chat_template(tokenizer.chat_template)


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for how text is split before BPE (it ships the regular expressions)."""
    steps = pre_tokenizer_steps(pre)
    if steps not in PRE_TOKENIZERS:
        shown = " + ".join(step.split(" ")[0] for step in steps) or "none"
        raise AfinaError("export_unsupported", f"the tokenizer's pre-tokenizer ({shown}) has no llama.cpp "
                         "equivalent afina knows", location="tokenizer",
                         hint="export --format safetensors, and convert it with llama.cpp's convert_hf_to_gguf.py")
    return PRE_TOKENIZERS[steps]


def pre_tokenizer_steps(pre: dict | None) -> tuple[str, ...]:
    """tokenizer.json's pre_tokenizer as the steps that decide how it splits: a Split step with its
    regular expression, ByteLevel with or without GPT-2's own, Digits one by one or grouped."""
    steps = []
    for step in pre.get("pretokenizers", [pre]) if pre else []:
        kind = step.get("type")
        if kind == "ByteLevel":
            steps.append(kind if step.get("use_regex", True) else "ByteLevel without regex")
        elif kind == "Digits":
            steps.append(kind if step.get("individual_digits", True) else "Digits grouped")
        elif kind == "Split":
            steps.append(f"Split {step.get('pattern', {}).get('Regex')}"
                         + ("" if step.get("behavior") == "Isolated" and not step.get("invert") else " (not isolated)"))
        else:
            steps.append(str(kind))
    return tuple(steps)


@contextlib.contextmanager
def quiet_native_stderr():
    """llama.cpp logs to the process's stderr from C; keep it off the user's terminal."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def quantize_with_llama_cpp(source: Path, target: Path, quant: str) -> None:
    import ctypes

    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    with quiet_native_stderr():
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if failed:
        raise AfinaError("export_failed", f"llama.cpp could not quantize to {quant}", location=str(target))


def check_gguf_file(path: Path, reference: list[Answer], conversations: list[list[dict]], max_new_tokens: int,
                    eos: int, tokenizer: PreTrainedTokenizerBase) -> RoundTrip:
    """Load the GGUF in llama.cpp and answer the prompts greedily as a llama.cpp server would: its own
    chat template and tokenizer, stopping at its end-of-generation tokens."""
    metadata = read_gguf_metadata(path)
    template = metadata.get("tokenizer.chat_template")
    if not template:
        raise mismatch("the GGUF has no chat template (tokenizer.chat_template)", str(path), "export again")
    if metadata.get("tokenizer.ggml.eos_token_id") != eos:
        raise mismatch(f"the GGUF's end-of-turn token is {metadata.get('tokenizer.ggml.eos_token_id')}, the tuned "
                       f"model's {eos}", str(path), "export again")
    llama_cpp = llama_cpp_module()
    start = time.perf_counter()
    try:
        with quiet_native_stderr():
            # the KV cache in f32 (llama.cpp keeps it in f16 unless told): the check measures the file
            llm = llama_cpp.Llama(str(path), n_ctx=context_size(reference, max_new_tokens), verbose=False,
                                  n_threads=max(1, min(8, os.cpu_count() or 1)), seed=0,
                                  type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    except (ValueError, RuntimeError) as exc:
        raise AfinaError("artifact_invalid", f"llama.cpp cannot load the GGUF: {exc}", location=str(path),
                         hint="export it again") from None
    report = RoundTrip(runtime="llama.cpp", load_seconds=time.perf_counter() - start)
    answers, prompt_ids, generated, seconds = [], [], 0, 0.0
    for messages, ref in zip(conversations, reference, strict=True):
        prompt = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                               add_generation_prompt=True)
        if prompt != ref.prompt:
            raise mismatch("the GGUF's chat template renders a prompt differently from the tuned model's",
                           str(path), "export again")
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        if ids != tokenizer(prompt, add_special_tokens=False)["input_ids"]:
            raise mismatch("llama.cpp tokenizes the prompt differently from the tuned model's tokenizer",
                           str(path), "the tokenizer was not exported faithfully; report this with the model name")
        tick = time.perf_counter()
        new = generate_greedy(llm, llama_cpp, ids, max_new_tokens)
        seconds += time.perf_counter() - tick
        generated += len(new)
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        answers.append(Answer(prompt, tuple(new), text))
        prompt_ids.append(ids)
    report.tokens_per_second = generated / seconds if seconds else 0.0
    check_stop_token(report, reference, prompt_ids, lambda ids: generate_greedy(llm, llama_cpp, ids, 1)[0], eos)
    llm.close()
    check_stops(reference, answers, eos, str(path))
    return compare_answers(report, reference, answers, eos)


def context_size(reference: list[Answer], max_new_tokens: int) -> int:
    longest = max((len(a.prompt) for a in reference), default=0)  # characters: at least as many as tokens
    return min(32768, longest + max_new_tokens + 16)


def generate_greedy(llm, llama_cpp, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens until an end-of-generation token (kept, as transformers keeps eos) or the limit."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.reset()
    new: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        new.append(token)
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(new) >= max_new_tokens:
            break
    return new
