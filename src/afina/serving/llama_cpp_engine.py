"""The llama.cpp engine (`afina serve model.gguf --engine llama.cpp`): a GGUF file served by llama.cpp
(llama-cpp-python), behind the same interface and events as the batching engine.

    served = load_gguf_models([resolve_source("tuned.gguf")])
    engine = LlamaCppEngine(served)              # then as Engine: start(), warm_up(), submit(request)

llama.cpp computes the logits; everything after them is afina's own, shared with the transformers
engine: the same tokenizer (read from the GGUF) and chat template, token choice (greedy, seeded
nucleus sampling, the JSON-object constraint), log-probabilities, stop strings and text deltas.
So an answer differs from the transformers engine's only by the file's arithmetic.

llama-cpp-python holds one sequence per model: requests are served one at a time, in arrival order.
A prompt that starts like the previous one (a shared system prompt, the same conversation) reuses
llama.cpp's KV cache up to where they part.
"""

from __future__ import annotations

import os
import queue
from pathlib import Path

import numpy as np
import torch

from afina.errors import AfinaError
from afina.serving.engine import (
    Engine,
    GenerationRequest,
    Sequence,
    advance_sequence,
    pick_token,
    token_logprob,
)
from afina.serving.loading import LoadedModel, ModelSource, ServedModels, end_token_ids


def llama_cpp_installed() -> bool:
    from afina.export.gguf_file import llama_cpp_module

    return llama_cpp_module() is not None


def load_gguf_models(sources: list[ModelSource]) -> ServedModels:
    """Each source's GGUF file in llama.cpp, with its tokenizer read from the same file. AfinaError for
    a source that is not a GGUF file, or when llama-cpp-python is missing."""
    from transformers import AutoTokenizer

    from afina.export.gguf_file import llama_cpp_module, quiet_native_stderr
    from afina.models.loading import read_gguf_metadata

    llama_cpp = llama_cpp_module()
    if llama_cpp is None:
        raise AfinaError("runtime_missing", "--engine llama.cpp needs llama-cpp-python, which is not installed",
                         location="--engine", hint="pip install llama-cpp-python, or serve with --engine transformers")
    loaded, routes = [], {}
    for source in sources:
        path = Path(source.base)
        if source.adapter_dir is not None or not (path.is_file() and path.suffix == ".gguf"):
            raise AfinaError("bad_option", f"{source.name}: --engine llama.cpp serves GGUF files only",
                             location="--engine", hint="export the model with `afina export --format gguf`, or "
                                                       "serve it with --engine transformers")
        read_gguf_metadata(path)  # a truncated or foreign file is a located error, not a crash in C
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        with quiet_native_stderr():
            llm = llama_cpp.Llama(str(path), n_ctx=0, n_threads=os.cpu_count() or 1, verbose=False)
        loaded.append(LoadedModel(model=llm, tokenizer=tokenizer, end_ids=end_token_ids(tokenizer, None),
                                  pad_id=tokenizer.pad_token_id or 0, context_length=llm.n_ctx(),
                                  device=torch.device("cpu")))
        routes[source.name] = (len(loaded) - 1, "")
    return ServedModels(loaded, routes)


class LlamaCppEngine(Engine):
    """One request at a time per process, each sequence decoded token by token in llama.cpp."""

    def __init__(self, models: ServedModels):
        super().__init__(models, max_batch_size=1, prefix_cache_tokens=0)
        self.current: GenerationRequest | None = None

    def running_sequences(self) -> int:
        return 1 if self.current is not None else 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.current = self.pending.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                if not self.current.cancelled.is_set():
                    self._serve(self.current)
            finally:
                self.current = None

    def _serve(self, request: GenerationRequest) -> None:
        loaded = self.models.get(request.model)
        for index in range(request.params.n):
            sequence = self._new_sequence(request, index, "", loaded)
            request.sequences.append(sequence)
            self._decode(loaded, sequence)
            self.largest_batch = max(self.largest_batch, 1)

    def _decode(self, loaded: LoadedModel, sequence: Sequence) -> None:
        import llama_cpp

        llm, prompt = loaded.model, sequence.request.prompt_ids
        llm.n_tokens = min(shared_prefix(llm.input_ids[:llm.n_tokens], prompt), len(prompt) - 1)
        llm.eval(prompt[llm.n_tokens:])  # eval drops the cached tokens past n_tokens first
        while True:
            pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            logits = torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy())
            token = pick_token(sequence, logits[None], prompt)
            wanted = sequence.request.params.logprobs
            logprob = token_logprob(logits, token, wanted) if wanted is not None else None
            advance_sequence(loaded, sequence, token, llm.n_tokens + 1, logprob)
            if sequence.finish_reason or sequence.request.cancelled.is_set():
                return
            llm.eval([token])


def shared_prefix(cached: np.ndarray, prompt: list[int]) -> int:
    """How many leading tokens `prompt` shares with the tokens in llama.cpp's cache."""
    length = min(len(cached), len(prompt))
    differs = np.flatnonzero(cached[:length] != np.asarray(prompt[:length]))
    return int(differs[0]) if len(differs) else length
