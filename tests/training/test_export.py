"""`afina export` on the tiny Llama: a merged safetensors directory and a GGUF file each load back in
their runtime and answer the run's test prompts exactly as the tuned model does in afina; a broken
export (chat template or end-of-turn token removed) is caught as `export_mismatch`; a method that
cannot merge and a truncated GGUF are located errors, not tracebacks.

The run is built directly (a LoRA with a fixed random update, no training): what is checked is
that the export reproduces the tuned model, whatever the model learned.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer
from typer.testing import CliRunner

from afina.config.schema import RunConfig
from afina.data.formats import normalize_row
from afina.errors import AfinaError
from afina.models.artifacts import save_trained
from afina.models.loading import load_model, load_tokenizer
from afina.models.methods import apply_method
from afina.pipeline.run_dir import write_records


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/training/conftest.py


def make_run(directory: Path, model_dir: Path, rows: list[dict], method: dict) -> Path:
    """A run directory as `afina train` leaves it: config, test split, trained weights, tokenizer."""
    directory.mkdir(parents=True)
    config = RunConfig.model_validate({"name": "tickets", "model": str(model_dir), "data": {"path": "tickets.jsonl"},
                                       "method": method, "training": {"precision": "fp32"},
                                       "eval": {"max_new_tokens": 12}, "gate": {"metric": "field_accuracy_mean"}})
    (directory / "config.json").write_text(config.model_dump_json(indent=2))
    write_records(directory / "test.jsonl", [normalize_row(row, i + 1)[0] for i, row in enumerate(rows)])
    torch.manual_seed(1)
    model = apply_method(load_model(str(model_dir)), config.method)
    with torch.no_grad():  # a visible update, so that an export without it would answer differently
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.3)
    save_trained(model, config.method, directory / "adapter")
    load_tokenizer(str(model_dir)).save_pretrained(directory / "adapter")
    return directory


@pytest.fixture
def lora_run(tmp_path, tiny_model_dir, ticket_rows) -> Path:
    return make_run(tmp_path / "tickets-lora", tiny_model_dir, ticket_rows[:6], {"name": "lora", "r": 4})


def test_safetensors_export_answers_as_the_tuned_model(lora_run, tmp_path):
    from afina.export.export import export_model

    result = export_model(str(lora_run), "safetensors", out=tmp_path / "out", prompts=4)
    assert result.check.answers == 4 and result.check.identical == 4
    files = {p.name for p in result.directory.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md",
            "export.json"} <= files
    generation = json.loads((result.directory / "generation_config.json").read_text())
    tokenizer = load_tokenizer(str(result.directory))
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.chat_template
    card = (result.directory / "README.md").read_text()
    assert "lora" in card and "field_accuracy_mean on these prompts" in card and "stops where" in card
    manifest = json.loads((result.directory / "export.json").read_text())
    report = manifest["round_trip"]
    assert report["metric"] == "field_accuracy_mean" and report["tuned_metric"] == report["export_metric"]
    weights = result.directory / "model.safetensors"
    assert manifest["files"]["model.safetensors"] == {"bytes": weights.stat().st_size,
                                                      "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert manifest["files"]["model.safetensors"]["sha256"] in card and report["min_agreement"] == 1.0
    assert report["stops_matched"] == report["stops_expected"]
    assert not any(p.name.startswith(".staging") for p in tmp_path.iterdir())
    exported, base = load_model(str(result.directory)), load_model(json.loads((lora_run / "config.json").read_text())["model"])
    assert not torch.equal(exported.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


MERGING_METHODS = {
    "full": {"name": "full"},
    "freeze": {"name": "freeze", "train_last_layers": 1},
    "lora": {"name": "lora", "r": 4},
    "dora": {"name": "dora", "r": 4},
    "rslora": {"name": "rslora", "r": 4},
    "qlora": {"name": "qlora", "r": 4},
    "ia3": {"name": "ia3"},
}
NOT_MERGING_METHODS = {
    "prefix": {"name": "prefix", "num_virtual_tokens": 2},
    "prompt": {"name": "prompt", "num_virtual_tokens": 2, "init": "random"},
    "loreft": {"name": "loreft", "r": 2, "positions": "all", "dropout": 0.0},
    "adapter": {"name": "adapter", "bottleneck": 4},
}


def test_every_method_is_tested_for_export():
    from afina.export.merged import merging_methods

    assert sorted(MERGING_METHODS) == sorted(merging_methods())
    assert not set(MERGING_METHODS) & set(NOT_MERGING_METHODS)


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.skipif(
    name == "qlora" and not torch.cuda.is_available(), reason="qlora's 4-bit base runs on bitsandbytes, CUDA only"))
    for name in MERGING_METHODS])
def test_every_merging_method_exports_answering_as_its_tuned_model(name, tmp_path, tiny_model_dir, ticket_rows):
    """The merged safetensors export computes what the tuned model computes (not the base's logits),
    and answers the test prompts with identical greedy tokens."""
    from afina.export.export import export_model
    from afina.export.merged import load_tuned
    from afina.export.source import resolve_source

    run = make_run(tmp_path / f"tickets-{name}", tiny_model_dir, ticket_rows[:3], MERGING_METHODS[name])
    result = export_model(str(run), "safetensors", out=tmp_path / "out", prompts=3)
    assert (result.check.answers, result.check.identical) == (3, 3)
    assert f"| method | {name} (merged into the weights) |" in (result.directory / "README.md").read_text()
    ids = load_tokenizer(str(tiny_model_dir))("the printer is jammed", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        exported = load_model(str(result.directory))(input_ids=ids).logits
        tuned = load_tuned(resolve_source(str(run)))(input_ids=ids).logits
        base = load_model(str(tiny_model_dir))(input_ids=ids).logits
    torch.testing.assert_close(exported, tuned, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(exported, base, atol=1e-2)


@pytest.mark.parametrize("name", NOT_MERGING_METHODS)
def test_a_method_that_does_not_merge_names_those_that_do(name, tmp_path, tiny_model_dir, ticket_rows):
    from afina.export.export import export_model

    run = make_run(tmp_path / f"tickets-{name}", tiny_model_dir, ticket_rows[:2], NOT_MERGING_METHODS[name])
    for export_format in ("safetensors", "gguf"):
        with pytest.raises(AfinaError) as caught:
            export_model(str(run), export_format, out=tmp_path / "out", verify=False)
        assert caught.value.code == "not_mergeable" and caught.value.location == "method"
        assert name in caught.value.message
        assert all(method in caught.value.hint for method in MERGING_METHODS)
    assert not (tmp_path / "out").exists()


def answer(tokens: tuple, text: str, margins: tuple = ()):
    from afina.export.roundtrip import Answer

    return Answer("prompt", tokens, text, margins or (5.0,) * len(tokens))


def test_the_stop_check_asks_the_export_for_the_token_after_the_tuned_answer():
    """Where the tuned model ended with eos, the export is given prompt + answer and must choose eos;
    an answer the tuned model did not end is not asked; a near tie of the tuned model's counts as agreeing."""
    from afina.export.roundtrip import RoundTrip, check_stop_token

    eos, asked = 9, []
    reference = [answer((1, 2, eos), "a"), answer((3, 4), "b"), answer((5, eos), "c"),
                 answer((6, eos), "d", margins=(5.0, 0.001))]

    def export_never_stops(ids):
        asked.append(ids)
        return 7

    report = check_stop_token(RoundTrip(), reference, [[100], [101], [102], [103]], export_never_stops, eos)
    assert asked == [[100, 1, 2], [102, 5], [103, 6]]
    assert (report.stops_expected, report.stops_matched) == (3, 1) and "token 7" in report.first_stop_difference
    report = check_stop_token(RoundTrip(), reference, [[100], [101], [102], [103]], lambda ids: eos, eos)
    assert report.stop_agreement == 1.0


def test_the_round_trip_scores_the_runs_metric_for_both_models():
    from afina.export.roundtrip import RoundTrip, score_task

    gold = ['{"category": "network", "n": 1}', '{"category": "printer", "n": 2}']
    report = RoundTrip(details=[{"tuned": gold[0], "export": '{"category": "network", "n": 0}'},
                                {"tuned": '{"category": "email", "n": 2}', "export": "not json"}])
    score_task(report, gold, "field_accuracy_mean")
    assert (report.metric, report.tuned_metric, report.export_metric) == ("field_accuracy_mean", 0.75, 0.25)
    score_task(report, gold, "field:category")
    assert (report.tuned_metric, report.export_metric) == (0.5, 0.5)
    score_task(report, gold, "loss")  # not a metric of answers: exact match instead
    assert (report.metric, report.tuned_metric, report.export_metric) == ("exact_match", 0.5, 0.0)


def test_too_few_stops_or_identical_answers_fail_the_export(tmp_path):
    from afina.export.export import default_min_agreement, require_agreement
    from afina.export.roundtrip import RoundTrip

    assert default_min_agreement("f16") == 1.0 and default_min_agreement("q8_0") > default_min_agreement("q4_k_m")
    stops_lost = RoundTrip(answers=4, identical=4, stops_expected=4, stops_matched=2, first_stop_difference="x")
    with pytest.raises(AfinaError) as caught:
        require_agreement(stops_lost, default_min_agreement("q8_0"), tmp_path / "m.gguf")
    assert caught.value.code == "export_mismatch" and "stops" in caught.value.message
    require_agreement(stops_lost, 0.5, tmp_path / "m.gguf")
    with pytest.raises(AfinaError) as caught:
        require_agreement(RoundTrip(answers=4, identical=3), default_min_agreement("f16"), tmp_path / "m.gguf")
    assert caught.value.code == "export_mismatch" and "3 of 4" in caught.value.message


def test_removed_end_of_turn_token_or_template_is_an_export_mismatch(lora_run, tmp_path):
    from afina.export.export import test_rows
    from afina.export.hf_dir import write_hf_directory
    from afina.export.merged import load_tuned, merge_tuned
    from afina.export.roundtrip import check_hf_directory, tuned_answers
    from afina.export.source import resolve_source

    source = resolve_source(str(lora_run))
    tokenizer = load_tokenizer(source.config.model)
    prompts = [row.prompt_messages() for row in test_rows(source, 2)]
    tuned = load_tuned(source)
    reference = tuned_answers(tuned, tokenizer, prompts, 12)
    directory = write_hf_directory(merge_tuned(tuned, source), tokenizer, tmp_path / "broken")
    eos = tokenizer.eos_token_id

    generation = json.loads((directory / "generation_config.json").read_text())
    (directory / "generation_config.json").write_text(json.dumps(generation | {"eos_token_id": tokenizer.bos_token_id}))
    with pytest.raises(AfinaError) as caught:
        check_hf_directory(directory, reference, prompts, 12, eos, torch.float32)
    assert caught.value.code == "export_mismatch" and "generation_config" in caught.value.location

    (directory / "generation_config.json").write_text(json.dumps(generation))
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    for name in ("chat_template.jinja", "chat_template.json"):
        (directory / name).unlink(missing_ok=True)
    with pytest.raises(AfinaError) as caught:
        check_hf_directory(directory, reference, prompts, 12, eos, torch.float32)
    assert caught.value.code == "export_mismatch"


def test_a_method_that_does_not_merge_is_refused_naming_those_that_do(tmp_path, tiny_model_dir, ticket_rows):
    import typer

    from afina.cli.console import user_errors
    from afina.cli.export import export_command

    run = make_run(tmp_path / "tickets-loreft", tiny_model_dir, ticket_rows[:2],
                   {"name": "loreft", "r": 2, "positions": "all", "dropout": 0.0})
    app = typer.Typer()
    app.command()(user_errors(export_command))
    result = CliRunner().invoke(app, [str(run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "error[not_mergeable]" in result.output and "lora" in result.output and "full" in result.output
    assert not (tmp_path / "out").exists()


def gguf_reference(run: Path, count: int = 4):
    """What the round trip compares a GGUF with: the tuned model's answers, and the merged model."""
    from afina.export.export import test_rows
    from afina.export.merged import load_tuned, merge_tuned
    from afina.export.roundtrip import tuned_answers
    from afina.export.source import resolve_source

    source = resolve_source(str(run))
    tokenizer = load_tokenizer(source.config.model)
    prompts = [row.prompt_messages() for row in test_rows(source, count)]
    tuned = load_tuned(source)
    reference = tuned_answers(tuned, tokenizer, prompts, 12)
    return tokenizer, prompts, reference, merge_tuned(tuned, source)


def test_gguf_export_answers_as_the_tuned_model_in_llama_cpp(lora_run, tmp_path):
    """f32: every token identical. f16: identical but for one answer that departs where the tuned
    model's top two tokens were 0.0003 logits apart (the random tiny model's near tie)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (dev extra) runs the GGUF round trip")
    from afina.export.export import export_model
    from afina.models.loading import read_gguf_metadata

    exact = export_model(str(lora_run), "gguf", "f32", out=tmp_path / "f32", prompts=4)
    assert (exact.check.answers, exact.check.identical, exact.check.near_ties) == (4, 4, 0)
    result = export_model(str(lora_run), "gguf", "f16", out=tmp_path / "out", prompts=4)
    assert result.path.suffix == ".gguf" and result.check.runtime == "llama.cpp"
    assert (result.check.answers, result.check.identical) == (4, 4) and result.check.near_ties <= 1
    assert result.size_bytes < exact.size_bytes
    metadata = read_gguf_metadata(result.path)
    tokenizer = AutoTokenizer.from_pretrained(lora_run / "adapter")
    assert metadata["tokenizer.chat_template"] == tokenizer.chat_template
    assert metadata["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    modelfile = (result.directory / "Modelfile").read_text()
    assert f"FROM ./{result.path.name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_q8_0_reports_its_agreement(lora_run, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (dev extra) runs the GGUF round trip")
    from afina.export.export import export_model

    result = export_model(str(lora_run), "gguf", "q8_0", out=tmp_path / "out", prompts=4, min_agreement=0.0)
    assert result.check.answers == 4 and 0 <= result.check.identical <= 4
    assert result.check.metric == "field_accuracy_mean" and result.check.export_metric is not None
    report = json.loads((result.directory / "export.json").read_text())["round_trip"]
    assert {"agreement", "stop_agreement", "tuned_metric", "export_metric"} <= set(report)
    f16 = export_model(str(lora_run), "gguf", "f16", out=tmp_path / "f16", prompts=1, verify=False)
    assert result.size_bytes < f16.size_bytes


def test_a_gguf_without_template_or_with_a_wrong_end_of_turn_token_is_an_export_mismatch(lora_run, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (dev extra) runs the GGUF round trip")
    from afina.export.gguf_file import check_gguf_file, write_gguf

    tokenizer, prompts, reference, merged = gguf_reference(lora_run, 2)
    eos = tokenizer.eos_token_id
    for broken in ({"chat_template": ""}, {"eos_token": "<pad>"}):
        damaged = AutoTokenizer.from_pretrained(lora_run / "adapter")
        for key, value in broken.items():
            setattr(damaged, key, value)
        path = write_gguf(merged, damaged, tmp_path / f"{next(iter(broken))}.gguf", "f16")
        with pytest.raises(AfinaError) as caught:
            check_gguf_file(path, reference, prompts, 12, eos, tokenizer)
        assert caught.value.code == "export_mismatch", broken


def test_a_truncated_or_corrupt_gguf_is_a_located_error(lora_run, tmp_path):
    from afina.export.gguf_file import write_gguf
    from afina.models.loading import read_gguf_metadata

    tokenizer, _, _, merged = gguf_reference(lora_run, 1)
    path = write_gguf(merged, tokenizer, tmp_path / "model.gguf", "f16")
    assert read_gguf_metadata(path)["general.architecture"] == "llama"
    data = path.read_bytes()
    truncated = [data[:size] for size in (len(data) - 100, len(data) // 3, 20)]
    corrupt = [b"XXXX" + data[4:],  # not a GGUF
               data[:4] + (99).to_bytes(4, "little") + data[8:],  # a version llama.cpp does not write
               data[:16] + (2**40).to_bytes(8, "little") + data[24:],  # an impossible count of metadata keys
               data[:40] + bytes(200) + data[240:]]  # zeros over the metadata
    for damaged in truncated + corrupt:
        path.write_bytes(damaged)
        with pytest.raises(AfinaError) as caught:
            read_gguf_metadata(path)
        assert caught.value.code == "artifact_invalid" and caught.value.location == str(path)


def test_an_exported_gguf_loads_back_as_a_model(lora_run, tmp_path, afina_home, ticket_rows):
    """What afina writes it reads: `model:` takes the GGUF (converted once, cached), computing what the
    merged model computes; a truncated one is refused with its code before any work."""
    from typer.testing import CliRunner

    from afina.cli.main import app
    from afina.export.gguf_file import write_gguf

    tokenizer, _, _, merged = gguf_reference(lora_run, 1)
    path = write_gguf(merged, tokenizer, tmp_path / "tuned.gguf", "f32")
    loaded = load_model(str(path))
    ids = tokenizer("The printer is jammed", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert load_tokenizer(str(path))("The printer is jammed")["input_ids"] == ids[0].tolist()
    assert len(list((afina_home / "models").iterdir())) == 1  # converted once, then read from the cache
    load_model(str(path))
    assert len(list((afina_home / "models").iterdir())) == 1

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ticket_rows))
    (tmp_path / "run.yaml").write_text(f"model: {truncated}\ndata: {{path: d.jsonl}}\ntraining: {{max_steps: 1}}\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "run.yaml")])
    assert result.exit_code == 2 and "error[artifact_invalid]" in result.output and "Traceback" not in result.output
