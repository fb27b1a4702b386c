"""Load an export in its target runtime, answer the run's test prompts greedily, and compare.

The common failures of an exported model are a lost chat template, a wrong end-of-turn token (the
model never stops), a broken tokenizer, and a quantization that ruins the answers. Each is checked
on its own, so the error says which one it is, and then the answers themselves are compared:

    reference = tuned_answers(tuned, tokenizer, prompts, max_new_tokens)            # afina, before export
    report = check_hf_directory(directory, reference, prompts, max_new_tokens, ...)  # transformers
    report = check_gguf_file(path, reference, prompts, max_new_tokens, ...)         # llama.cpp
    score_task(report, gold_answers, "field_accuracy_mean")                         # what it costs the task

The chat template is checked by rendering every prompt with the export's own template; the stop
token by the export's metadata and, explicitly, by handing the export each prompt with the tuned
model's whole answer: where the tuned model ended with its end-of-turn token, the export must choose
that token next. This holds whether or not the answers agree, so a quantized export that phrases an
answer differently is still shown to stop where the tuned model stops.

Every prompt is answered on its own (no batch padding) on both sides, so that an unquantized export
gives the same tokens as afina, not merely close ones. One tolerance, for rounding: where an answer
departs from the tuned model's at a token the tuned model scored within TIE_MARGIN logits of its
runner-up (a near tie, which any change in rounding may flip: f16 weights, another matmul order),
the answer counts as agreeing, and the report counts it as a near tie.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from afina.errors import AfinaError
from afina.eval.metrics import per_example_scores

TIE_MARGIN = 0.01
"""Logits between the tuned model's top two tokens below which a differing export is rounding, not damage."""


@dataclass(frozen=True)
class Answer:
    """One greedy answer: the rendered prompt, the generated token ids (end-of-turn included when the
    model stopped) and the text."""

    prompt: str
    tokens: tuple[int, ...]
    text: str
    margins: tuple[float, ...] = ()  # the tuned model's top-1 minus top-2 logit at each step (reference only)


@dataclass
class RoundTrip:
    """What the round trip measured: exact answer agreement, where the export stops, the task metric
    on the same prompts for both models, and the runtime's speed."""

    answers: int = 0
    identical: int = 0
    near_ties: int = 0  # of `identical`: answers that departed only at a near tie (TIE_MARGIN)
    stopped: int = 0  # answers that ended with the end-of-turn token on both sides
    stops_expected: int = 0  # answers the tuned model ended with its end-of-turn token
    stops_matched: int = 0  # of those: where the export, given the tuned answer, chose that token next
    metric: str = ""  # the run's task metric, scored against the test split's reference answers
    tuned_metric: float | None = None
    export_metric: float | None = None
    load_seconds: float = 0.0
    tokens_per_second: float = 0.0
    first_difference: str | None = None
    first_stop_difference: str | None = None
    runtime: str = ""
    details: list[dict] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        return self.identical / self.answers if self.answers else 1.0

    @property
    def stop_agreement(self) -> float:
        return self.stops_matched / self.stops_expected if self.stops_expected else 1.0


@torch.no_grad()
def tuned_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int) -> list[Answer]:
    """The tuned model's greedy answers in afina, one prompt at a time, stopping at eos."""
    model.eval()
    device = next(model.parameters()).device
    answers = []
    for messages in conversations:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                else tokenizer.eos_token_id, output_logits=True, return_dict_in_generate=True)
        new = tuple(output.sequences[0, ids.shape[1]:].tolist())
        margins = tuple(float(top[0] - top[1]) for top in (step[0].float().topk(2).values for step in output.logits))
        answers.append(Answer(prompt, new, tokenizer.decode(new, skip_special_tokens=True).strip(), margins))
    return answers


def mismatch(message: str, location: str, hint: str) -> AfinaError:
    return AfinaError("export_mismatch", message, location=location, hint=hint)


def compare_answers(report: RoundTrip, reference: list[Answer], exported: list[Answer], eos: int) -> RoundTrip:
    """Count identical answers; the first difference is kept to show the user."""
    for ref, got in zip(reference, exported, strict=True):
        same = ref.tokens == got.tokens or ref.text == got.text
        if not same and near_tie(ref, got):
            report.near_ties += 1
            same = True
        report.answers += 1
        report.identical += same
        report.stopped += bool(ref.tokens and got.tokens and ref.tokens[-1] == eos and got.tokens[-1] == eos)
        report.details.append({"tuned": ref.text, "export": got.text, "identical": same})
        if not same and report.first_difference is None:
            report.first_difference = f"tuned {ref.text[:80]!r}, export {got.text[:80]!r}"
    return report


def near_tie(ref: Answer, got: Answer) -> bool:
    """Whether `got` first departs from `ref` at a token the tuned model scored within TIE_MARGIN of its runner-up."""
    step = next((i for i, (a, b) in enumerate(zip(ref.tokens, got.tokens)) if a != b), min(len(ref.tokens), len(got.tokens)))
    return step < len(ref.margins) and ref.margins[step] < TIE_MARGIN


def check_stops(reference: list[Answer], exported: list[Answer], eos: int, location: str) -> None:
    """The export must stop where the tuned model stops: an answer the tuned model ended with its
    end-of-turn token that the export ran on past (to the token limit) is a wrong stop token."""
    for ref, got in zip(reference, exported, strict=True):
        ref_stops = bool(ref.tokens) and ref.tokens[-1] == eos
        got_stops = bool(got.tokens) and got.tokens[-1] == eos
        if ref_stops and not got_stops and len(got.tokens) > len(ref.tokens):
            raise mismatch("the export does not stop where the tuned model stops (end-of-turn token lost or wrong): "
                           f"tuned {ref.text[:60]!r}, export {got.text[:60]!r}", location,
                           "the export's end-of-turn token must be the tokenizer's eos; export again")


def check_stop_token(report: RoundTrip, reference: list[Answer], prompt_ids: list[list[int]],
                     next_token: Callable[[list[int]], int], eos: int) -> RoundTrip:
    """Where the tuned model ended an answer with `eos`, give the export the prompt and the tuned
    model's answer and count whether its greedy next token is `eos` too (a near tie of the tuned
    model's counts, as for answers). `next_token` runs the export on token ids."""
    for ids, ref in zip(prompt_ids, reference, strict=True):
        if not ref.tokens or ref.tokens[-1] != eos:
            continue
        report.stops_expected += 1
        chosen = next_token(list(ids) + list(ref.tokens[:-1]))
        if chosen == eos or (ref.margins and ref.margins[-1] < TIE_MARGIN):
            report.stops_matched += 1
        elif report.first_stop_difference is None:
            report.first_stop_difference = f"after {ref.text[:60]!r} the export continues with token {chosen}"
    return report


def score_task(report: RoundTrip, gold: list[str], metric: str) -> RoundTrip:
    """The task metric on the round trip's prompts, for the tuned model's answers and the export's,
    scored by afina's evaluation against the reference answers: what the differences cost the task.
    `metric` is the run's gate metric; exact match where that is not a metric of generated answers
    (a loss) or does not apply to these answers (field accuracy without JSON references)."""
    tuned = per_example_scores([d["tuned"] for d in report.details], gold)
    export = per_example_scores([d["export"] for d in report.details], gold)
    name = metric if metric in tuned else "exact_match"
    report.metric = name
    report.tuned_metric = sum(tuned[name]) / len(tuned[name]) if tuned[name] else None
    report.export_metric = sum(export[name]) / len(export[name]) if export[name] else None
    return report


# -- transformers ------------------------------------------------------------------------------------------------

@torch.no_grad()
def check_hf_directory(directory: Path, reference: list[Answer], conversations: list[list[dict]],
                       max_new_tokens: int, eos: int, dtype: torch.dtype) -> RoundTrip:
    """Load the exported directory with plain transformers (its own tokenizer, chat template and
    generation config, as any user of it would) and answer the prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)
    model.eval()
    generation = GenerationConfig.from_pretrained(directory)
    report = RoundTrip(runtime="transformers", load_seconds=time.perf_counter() - start)
    stops = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    if eos not in stops:
        raise mismatch(f"generation_config.json stops at {stops}, the tuned model at token {eos}",
                       str(directory / "generation_config.json"), "the end-of-turn token must be eos; export again")
    if not tokenizer.chat_template:
        raise mismatch("the exported tokenizer has no chat template", str(directory / "tokenizer_config.json"),
                       "export again; a runtime would format prompts differently from training")
    answers, prompt_ids, generated, seconds = [], [], 0, 0.0
    for messages, ref in zip(conversations, reference, strict=True):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if prompt != ref.prompt:
            raise mismatch("the exported chat template renders a prompt differently from the tuned model's",
                           str(directory / "tokenizer_config.json"), "export again")
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        tick = time.perf_counter()
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=generation,
                                max_new_tokens=max_new_tokens)
        seconds += time.perf_counter() - tick
        new = tuple(output[0, ids.shape[1]:].tolist())
        generated += len(new)
        answers.append(Answer(prompt, new, tokenizer.decode(new, skip_special_tokens=True).strip()))
        prompt_ids.append(ids[0].tolist())
    report.tokens_per_second = generated / seconds if seconds else 0.0
    check_stops(reference, answers, eos, str(directory / "generation_config.json"))
    check_stop_token(report, reference, prompt_ids,
                     lambda ids: int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()), eos)
    return compare_answers(report, reference, answers, eos)
