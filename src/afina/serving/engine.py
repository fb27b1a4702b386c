"""A continuous-batching generation engine on transformers models, with a KV cache.

    engine = Engine(served_models)                 # afina.serving.loading.load_served_models
    engine.start(); engine.warm_up()
    request = engine.submit(GenerationRequest("default", prompt_ids, SamplingParams(max_tokens=32)), deliver)
    ...                                            # deliver(event) is called from the engine's thread

One background thread runs the loop. Each loaded model (a base and the LoRA adapters loaded on it)
has one running batch. Between decode steps queued requests are prefilled together and join the
batch (their KV cache padded on the left to the batch's length); a sequence that finishes leaves at
once and its cache rows are dropped. Rows of one batch may use different adapters: PEFT selects each
row's adapter in the same forward pass (`adapter_names`).

Llama-family models (plain or with LoRA adapters) decode through `afina.serving.decode`: a lean
step over a KV cache that rows join and leave in place, with oneDNN matmuls; any other model
decodes through transformers' forward. Prefill always runs transformers' forward, at most
`max_prefill_tokens` prompt tokens between two decode steps.

A prompt that starts with tokens a recent prompt started with (a shared system prompt, an earlier
turn of the conversation) reuses their KV cache (`PrefixCache`): only the rest is computed, and the
reused rows sit in the batch like any other.

Events delivered per sequence (a request with n=2 has sequences 0 and 1):
    Delta(index, text, logprobs)                   # new text since the last event, and its tokens'
                                                   # log-probabilities when the request asked for them
    Finished(index, finish_reason, completion_tokens)
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from afina.models.json_constraint import JsonObjectLogitsProcessor
from afina.serving.decode import LeanDecoder, SlotCache
from afina.serving.loading import LoadedModel, ServedModels
from afina.serving.prefix_cache import PrefixCache

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_object: bool = False
    n: int = 1
    logprobs: int | None = None  # None: no log-probabilities; k: each token's and the k likeliest ones'


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature, top_p and any
    constraint), with the `top` likeliest tokens at that step as (token id, log-probability)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Delta:
    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Finished:
    index: int
    finish_reason: str  # stop | length
    completion_tokens: int


@dataclass
class GenerationRequest:
    """A request for `model` (a served name) continuing `prompt_ids`."""

    model: str
    prompt_ids: list[int]
    params: SamplingParams
    deliver: Callable[[Delta | Finished], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    sequences: list[Sequence] = field(default_factory=list)  # filled by the engine when admitted


@dataclass
class Sequence:
    """One output row of a request, with its decoding state."""

    request: GenerationRequest
    index: int
    adapter: str
    generator: torch.Generator | None
    constraint: JsonObjectLogitsProcessor | None
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already delivered
    finish_reason: str | None = None
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens whose text is held back


@dataclass
class Batch:
    """The running sequences of one loaded model and their KV cache (rows aligned with `sequences`):
    a SlotCache where the model decodes through `LeanDecoder`, else transformers' DynamicCache (and
    always while prefilling)."""

    sequences: list[Sequence]
    cache: DynamicCache | SlotCache
    mask: torch.Tensor  # [rows, cached positions]: 1 where a real token is cached, 0 on left padding
    positions: torch.Tensor  # [rows]: the position of each row's next token
    next_ids: torch.Tensor  # [rows]: the token each row feeds next


class Engine:
    """Generation for the served models, one batch per loaded model, stepped in turn by one thread.
    `prefix_cache_tokens` bounds the prompt prefixes kept for reuse (0: none kept); `lean_decode`
    False decodes every model through transformers' forward. Between two decode steps at most
    `max_prefill_tokens` prompt tokens are prefilled (always at least one request), so a crowd of
    newcomers joins over a few steps instead of stalling the running rows for all of their prompts."""

    def __init__(self, models: ServedModels, max_batch_size: int = 32, prefix_cache_tokens: int = 8192,
                 lean_decode: bool = True, max_prefill_tokens: int = 512):
        self.models = models
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.decoders: dict[int, LeanDecoder | None] = {
            id(loaded): LeanDecoder.for_model(loaded.model) if lean_decode else None for loaded in models.loaded}
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        self.pending: queue.Queue[GenerationRequest] = queue.Queue()
        self.batches: dict[int, Batch] = {}
        self.ready = False
        self.largest_batch = 0  # rows in the largest decode step so far
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the caller's side ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="afina-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.ready = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def running_sequences(self) -> int:
        """Rows decoding now, across every loaded model."""
        return sum(len(batch.sequences) for batch in list(self.batches.values()))

    def queued_requests(self) -> int:
        return self.pending.qsize()

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        self.models.get(request.model)  # unknown names fail here, in the caller's thread
        self.pending.put(request)
        return request

    def submit_many(self, requests: list[GenerationRequest]) -> None:
        """Queue requests at once, so the engine admits them together."""
        for request in requests:
            self.models.get(request.model)
        with self.pending.mutex:
            self.pending.queue.extend(requests)
            self.pending.unfinished_tasks += len(requests)
            self.pending.not_empty.notify()

    def generate(self, model: str, prompt_ids: list[int], params: SamplingParams, timeout: float = 600) -> list[list[int]]:
        """Blocking: the generated token ids of each of the request's n sequences (tests, benchmarks)."""
        done = threading.Event()
        results: dict[int, list[int]] = {}
        request = GenerationRequest(model, prompt_ids, params)

        def deliver(event):
            if isinstance(event, Finished):
                results[event.index] = []
                if len(results) == params.n:
                    done.set()

        request.deliver = deliver
        self.submit(request)
        if not done.wait(timeout):
            request.cancelled.set()
            raise TimeoutError("generation did not finish in time")
        return [s.generated for s in sorted(request.sequences, key=lambda s: s.index)]

    def warm_up(self) -> None:
        """One short generation on every loaded model (first-call costs paid before traffic); then ready."""
        for name in self.models.first_name_per_model():
            self.generate(name, self.models.get(name).tokenizer("hello")["input_ids"][:8] or [0],
                          SamplingParams(max_tokens=2, temperature=0))
        self.ready = True

    # --- the engine's thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.batches:
                try:
                    first = self.pending.get(timeout=0.1)
                except queue.Empty:
                    continue
                self._admit([first])
            else:
                self._admit([])
            for key in list(self.batches):
                self._step(key)

    @torch.inference_mode()
    def _admit(self, taken: list[GenerationRequest]) -> None:
        """Prefill queued requests and let them join their model's running batch. Requests whose prompt
        starts with a cached prefix are prefilled together per prefix, from that prefix on."""
        running = sum(len(b.sequences) for b in self.batches.values())
        prompts = sum(len(r.prompt_ids) for r in taken)
        while running + sum(r.params.n for r in taken) < self.max_batch_size and prompts < self.max_prefill_tokens:
            with self.pending.mutex:  # look at the next request before taking it
                if not self.pending.queue:
                    break
                following = self.pending.queue[0]
                if taken and prompts + len(following.prompt_ids) > self.max_prefill_tokens:
                    break
            taken.append(self.pending.get_nowait())
            prompts += len(following.prompt_ids)
        groups: dict[tuple, list[Sequence]] = {}
        prefixes: dict[tuple, tuple] = {}
        for request in taken:
            if request.cancelled.is_set():
                continue
            loaded, adapter = self.models.get(request.model), self.models.adapter_of(request.model)
            prefix = self.prefix_cache.find((id(loaded), adapter), request.prompt_ids)
            group = (id(loaded), id(prefix[0]) if prefix else None, prefix[1] if prefix else 0)
            prefixes[group] = prefix
            sequences = [self._new_sequence(request, index, adapter, loaded) for index in range(request.params.n)]
            request.sequences.extend(sequences)
            groups.setdefault(group, []).extend(sequences)
        for group, sequences in groups.items():
            key = group[0]
            joining = self._prefill(self.models.by_id(key), sequences, prefixes[group])
            if joining is not None:
                self.batches[key] = self._join(key, self.batches.get(key), joining)

    def _join(self, key: int, running: Batch | None, joining: Batch) -> Batch:
        """The running batch with the prefilled rows of `joining` added."""
        decoder = self.decoders.get(key)
        if decoder is None:
            return merge_batches(running, joining) if running is not None else joining
        if running is None:
            running = Batch([], SlotCache.like(decoder), joining.mask[:0], joining.positions[:0], joining.next_ids[:0])
        running.cache.join([(layer.keys, layer.values) for layer in joining.cache.layers], joining.mask)
        return Batch(running.sequences + joining.sequences, running.cache, running.cache.live_mask(),
                     torch.cat([running.positions, joining.positions]), torch.cat([running.next_ids, joining.next_ids]))

    def _new_sequence(self, request: GenerationRequest, index: int, adapter: str, loaded: LoadedModel) -> Sequence:
        params = request.params
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=loaded.device)
            generator.manual_seed(params.seed + index if params.seed is not None else
                                  int(torch.randint(0, 2**62, (1,)).item()))
        constraint = (JsonObjectLogitsProcessor(loaded.tokenizer, params.max_tokens, loaded.end_ids[0])
                      if params.json_object else None)
        return Sequence(request, index, adapter, generator, constraint)

    def _prefill(self, loaded: LoadedModel, sequences: list[Sequence], prefix: tuple | None) -> Batch | None:
        """Compute the prompts (after the cached `prefix`, (entry, length), when there is one), each
        right-aligned after the prefix; padding is masked, wherever it sits."""
        cached = prefix[1] if prefix else 0
        suffixes = [s.request.prompt_ids[cached:] for s in sequences]
        longest = max(len(suffix) for suffix in suffixes)
        ids = torch.full((len(sequences), longest), loaded.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), cached + longest), dtype=torch.long)
        mask[:, :cached] = 1
        for row, suffix in enumerate(suffixes):
            ids[row, longest - len(suffix):] = torch.tensor(suffix)
            mask[row, cached + longest - len(suffix):] = 1
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, cached:]
        cache = prefix[0].cache(cached, len(sequences)) if prefix else DynamicCache()
        decoder = self.decoders.get(id(loaded))
        with decoder.reordered_linears() if decoder is not None else contextlib.nullcontext():
            logits = loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                  use_cache=True, logits_to_keep=1, **adapter_kwargs(loaded, sequences)).logits[:, -1]
        batch = Batch(sequences, cache, mask, mask.sum(-1), torch.zeros(len(sequences), dtype=torch.long,
                                                                         device=loaded.device))
        self._remember_prompts(loaded, batch)
        return self._choose(loaded, batch, logits)

    def _remember_prompts(self, loaded: LoadedModel, batch: Batch) -> None:
        """Offer each prefilled prompt's KV cache to the prefix cache (once per request)."""
        for row, sequence in enumerate(batch.sequences):
            if sequence.index == 0:
                self.prefix_cache.store((id(loaded), sequence.adapter), sequence.request.prompt_ids,
                                        lambda row=row: row_cache(batch, row))

    def _step(self, key: int) -> None:
        with torch.inference_mode():
            loaded, batch, decoder = self.models.by_id(key), self.batches[key], self.decoders.get(key)
            if decoder is not None:
                batch.cache.open_column()
                names = adapter_kwargs(loaded, batch.sequences).get("adapter_names")
                logits = decoder.step(batch.next_ids, batch.positions, batch.cache, names)
                batch.mask, batch.positions = batch.cache.live_mask(), batch.positions + 1
            else:
                mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
                logits = loaded.model(input_ids=batch.next_ids[:, None], attention_mask=mask,
                                      position_ids=batch.positions[:, None], cache=batch.cache, use_cache=True,
                                      **adapter_kwargs(loaded, batch.sequences)).logits[:, -1]
                batch.mask, batch.positions = mask, batch.positions + 1
            self.largest_batch = max(self.largest_batch, len(batch.sequences))
            kept = self._choose(loaded, batch, logits)
        if kept is None:
            del self.batches[key]
        else:
            self.batches[key] = kept

    def _choose(self, loaded: LoadedModel, batch: Batch, logits: torch.Tensor) -> Batch | None:
        """Pick each row's next token, deliver text, and drop the rows that finished or were cancelled."""
        logits = logits.float()
        greedy = logits.argmax(-1).tolist()  # one call for every row; used by greedy rows without a constraint
        lengths = (batch.positions + 1).tolist()
        chosen = []
        for row, sequence in enumerate(batch.sequences):
            params = sequence.request.params
            if params.temperature == 0 and sequence.constraint is None:
                token = greedy[row]
            else:
                token = pick_token(sequence, logits[row:row + 1], sequence.request.prompt_ids)
            chosen.append(token)
            logprob = token_logprob(logits[row], token, params.logprobs) if params.logprobs is not None else None
            advance_sequence(loaded, sequence, token, lengths[row], logprob)
        batch.next_ids = torch.tensor(chosen, dtype=torch.long, device=loaded.device)
        keep = [row for row, s in enumerate(batch.sequences) if s.finish_reason is None
                and not s.request.cancelled.is_set()]
        if not keep:
            return None
        if len(keep) < len(batch.sequences):
            batch = select_rows(batch, keep)
        return batch


def keep_rows(batch: Batch, rows: list[int]) -> Batch:
    """The batch with only `rows` (ascending), its SlotCache kept in place: rows may change order."""
    order = batch.cache.keep(rows)
    index = torch.tensor(order, dtype=torch.long, device=batch.positions.device)
    return Batch([batch.sequences[r] for r in order], batch.cache, batch.cache.live_mask(), batch.positions[index],
                 batch.next_ids[index])


def advance_sequence(loaded: LoadedModel, sequence: Sequence, token: int, length: int,
                     logprob: TokenLogprob | None = None) -> None:
    """Append `token` to the sequence (`length` tokens long with it), decide whether it finished, and
    deliver the text that is safe to show: a partial character or a possible stop string is held back
    (with its tokens' log-probabilities) until the next token settles it."""
    params = sequence.request.params
    if token in loaded.end_ids:
        sequence.finish_reason = "stop"
    else:
        sequence.generated.append(token)
        if logprob is not None:
            sequence.unsent_logprobs.append(logprob)
    text = loaded.tokenizer.decode(sequence.generated, skip_special_tokens=True)
    for stop in params.stop:
        at = text.find(stop, max(0, sequence.sent - len(stop)))
        if at >= 0:
            text, sequence.finish_reason = text[:at], "stop"
    if sequence.finish_reason is None and (len(sequence.generated) >= params.max_tokens
                                           or length >= loaded.context_length):
        sequence.finish_reason = "length"
    safe = len(text) if sequence.finish_reason else safe_length(text, params.stop)
    if safe > sequence.sent or (sequence.finish_reason and sequence.unsent_logprobs):
        sequence.request.deliver(Delta(sequence.index, text[sequence.sent:safe], sequence.unsent_logprobs))
        sequence.sent, sequence.unsent_logprobs = max(safe, sequence.sent), []
    if sequence.finish_reason:
        sequence.request.deliver(Finished(sequence.index, sequence.finish_reason, len(sequence.generated)))


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability among `logits` (one row) and the `top` likeliest tokens'."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = logprobs.topk(top) if top else None
    alternatives = tuple(zip(best.indices.tolist(), best.values.tolist())) if best is not None else ()
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def pick_token(sequence: Sequence, logits: torch.Tensor, prompt_ids: list[int]) -> int:
    """Greedy at temperature 0, else nucleus sampling with the sequence's own generator."""
    if sequence.constraint is not None:
        ids = torch.tensor([prompt_ids + sequence.generated])
        logits = sequence.constraint(ids, logits)
    params = sequence.request.params
    if params.temperature == 0:
        return int(logits[0].argmax())
    probabilities = torch.softmax(logits[0] / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probabilities.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p > params.top_p  # keep the smallest set reaching top_p
        sorted_p[outside] = 0
        probabilities = torch.zeros_like(probabilities).scatter(0, order, sorted_p)
    return int(torch.multinomial(probabilities, 1, generator=sequence.generator))


def safe_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` may be delivered: hold back a partial character and a possible stop string."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for size in range(min(len(stop) - 1, end), 0, -1):
            if text[end - size:end] == stop[:size]:
                end -= size
                break
    return end


def adapter_kwargs(loaded: LoadedModel, sequences: list[Sequence]) -> dict:
    if not loaded.adapters:
        return {}
    return {"adapter_names": [s.adapter or BASE_ADAPTER for s in sequences]}


def merge_batches(running: Batch, joining: Batch) -> Batch:
    """One batch of both, the shorter cache padded on the left (masked, so attention never sees it)."""
    length = max(running.mask.shape[1], joining.mask.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = length - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    for mine, theirs in zip(running.cache.layers, joining.cache.layers, strict=True):
        mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)])
        mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)])
    return Batch(running.sequences + joining.sequences, running.cache,
                 torch.cat([pad(running.mask, 1), pad(joining.mask, 1)]),
                 torch.cat([running.positions, joining.positions]), torch.cat([running.next_ids, joining.next_ids]))


def select_rows(batch: Batch, rows: list[int]) -> Batch:
    """The batch with only `rows`, and without the leading cache columns no kept row uses."""
    if isinstance(batch.cache, SlotCache):
        return keep_rows(batch, rows)
    index = torch.tensor(rows, device=batch.mask.device)
    mask = batch.mask[index]
    first = int(mask.any(0).nonzero()[0])
    for layer in batch.cache.layers:
        layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
    return Batch([batch.sequences[r] for r in rows], batch.cache, mask[:, first:], batch.positions[index],
                 batch.next_ids[index])


def row_cache(batch: Batch, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One row's cached keys and values per layer, its padding left out: [1, heads, tokens, dim] each."""
    columns = batch.mask[row].nonzero().squeeze(1)
    return [(layer.keys[row:row + 1, :, columns], layer.values[row:row + 1, :, columns])
            for layer in batch.cache.layers]
