"""Encryption at rest through afina's own workflow, on the tiny model.

The check a security reviewer asks for: known text and planted personal data go into a data file, a
run completes with `data.mask_pii: true` and a master key, and then neither the text nor any planted
value is found in any file under the afina home (raw bytes) nor in any row of the store's database.
The run stays usable with the key (and after a key rotation, with the new key only), and a resumed
run restores exactly from its encrypted checkpoint."""

from __future__ import annotations

import json
import secrets
import sqlite3
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from afina.cli.main import app
from afina.errors import AfinaError
from afina.security.encryption import is_encrypted, read_bytes
from tests.conftest import chat_row, write_jsonl

KNOWN_TEXT = "El contrato marco Orquidea-47 de suministro vence en septiembre"
PLANTED = {"email": "marta.quintero@bancoejemplo.es", "iban": "ES9121000418450200051332", "dni": "12345678Z",
           "phone": "+34 612 345 678"}
QUIET = Console(quiet=True)


def planted_rows(ticket_rows: list[dict]) -> list[dict]:
    """The usual tickets, a third of them carrying the known text and every planted value."""
    rows = []
    for i, row in enumerate(ticket_rows):
        if i % 3 == 0:
            user = (f"{KNOWN_TEXT}. Cliente {PLANTED['email']}, IBAN {PLANTED['iban']}, DNI {PLANTED['dni']}, "
                    f"llame al {PLANTED['phone']}. {row['messages'][1]['content']}")
            row = chat_row(user, f"{KNOWN_TEXT}: {row['messages'][2]['content']}", system="classify")
        rows.append(row)
    return rows


def needles() -> dict[str, bytes]:
    found = {"known text": KNOWN_TEXT.encode(), "known text (part)": b"Orquidea-47"}
    found |= {name: value.encode() for name, value in PLANTED.items()}
    found |= {"phone digits": b"612 345 678", "dni digits": b"12345678", "iban digits": b"21000418450200051332",
              "email user": b"marta.quintero"}
    return found


def leaks_in_files(root: Path) -> list[str]:
    return [f"{name} in {path.relative_to(root)}" for path in sorted(root.rglob("*")) if path.is_file()
            for name, needle in needles().items() if needle in path.read_bytes()]


def leaks_in_database(path: Path) -> list[str]:
    """Every row of every table, as text."""
    leaks = []
    with sqlite3.connect(path) as database:
        tables = [name for (name,) in database.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in database.execute(f'SELECT * FROM "{table}"'):
                text = repr(row).encode() + b" " + " ".join(str(v) for v in row).encode()
                leaks += [f"{name} in table {table}" for name, needle in needles().items() if needle in text]
    return leaks


@pytest.fixture
def master_key_hex(monkeypatch) -> str:
    key = secrets.token_hex(32)
    monkeypatch.setenv("AFINA_MASTER_KEY", key)
    monkeypatch.delenv("AFINA_MASTER_KEY_FILE", raising=False)
    return key


def write_config(tmp_path: Path, model_dir: Path, rows: list[dict]) -> Path:
    data = write_jsonl(tmp_path / "contracts.jsonl", rows)
    config = {"name": "contracts", "model": str(model_dir), "data": {"path": str(data), "test": 0.25, "mask_pii": True},
              "training": {"max_steps": 6, "row_length": 256, "learning_rate": 5e-3, "eval_every": 3,
                           "save_every": 2, "warmup_ratio": 0.0, "precision": "fp32"},
              "eval": {"max_new_tokens": 4, "max_examples": 8}, "gate": {"metric": "loss"}}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))
    return path


def decrypted_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("afina-decrypted-*"))


def test_a_run_with_masking_and_a_master_key_leaves_nothing_readable(tiny_model_dir, ticket_rows, tmp_path,
                                                                      afina_home, master_key_hex, monkeypatch):
    rows = planted_rows(ticket_rows)
    config = write_config(tmp_path, tiny_model_dir, rows)
    assert all(value in config.with_name("contracts.jsonl").read_text() for value in [KNOWN_TEXT, *PLANTED.values()])
    before = decrypted_dirs()

    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    run = next((afina_home / "runs").iterdir())
    assert (afina_home / "afina.db").is_file() and (run / "adapter").is_dir() and (run / "checkpoints").is_dir()

    assert leaks_in_files(afina_home) == []
    assert leaks_in_database(afina_home / "afina.db") == []
    sealed = [run / "train.jsonl", run / "test.jsonl", run / "eval.json", *(run / "adapter").rglob("*.*"),
              *(p for p in (run / "checkpoints").rglob("*") if p.is_file() and p.name != "manifest.json")]
    assert all(is_encrypted(path) for path in sealed), [str(p) for p in sealed if not is_encrypted(p)]
    assert decrypted_dirs() == before  # every private decrypted copy was removed

    # the key reads it all back: the known text is there (PII masked), and the tuned model loads
    test_split = read_bytes(run / "train.jsonl").decode() + read_bytes(run / "test.jsonl").decode()
    assert KNOWN_TEXT in test_split and "<EMAIL_1>" in test_split and PLANTED["email"] not in test_split
    from afina.pipeline.run_dir import check_run_dir
    from afina.pipeline.stages import load_tuned_model

    config_saved = check_run_dir(run, ("test",), trained=True)
    assert load_tuned_model(config_saved, run) is not None

    # rotation: the new key reads everything, the old one nothing
    new_key = secrets.token_hex(32)
    monkeypatch.setenv("AFINA_NEW_MASTER_KEY", new_key)
    rotated = CliRunner().invoke(app, ["keys", "rotate"])
    assert rotated.exit_code == 0, rotated.output
    with pytest.raises(AfinaError) as raised:
        check_run_dir(run, ("test",), trained=True)
    assert raised.value.code == "decryption_failed"
    monkeypatch.setenv("AFINA_MASTER_KEY", new_key)
    check_run_dir(run, ("test",), trained=True)
    assert load_tuned_model(config_saved, run) is not None
    evaluated = CliRunner().invoke(app, ["eval", str(run)])
    assert evaluated.exit_code == 0, evaluated.output
    assert leaks_in_files(afina_home) == [] and decrypted_dirs() == before

    monkeypatch.setenv("AFINA_MASTER_KEY", secrets.token_hex(32))  # a wrong key: one clear error, no garbage
    failed = CliRunner().invoke(app, ["eval", str(run)])
    assert failed.exit_code == 2 and "error[decryption_failed]" in failed.output, failed.output


def test_resume_from_an_encrypted_checkpoint_matches_an_uninterrupted_run(tiny_model_dir, tiny_tokenizer, ticket_rows,
                                                                           tmp_path, master_key_hex, monkeypatch):
    import afina.sealing
    from afina.models.methods import trainable_parameters
    from afina.security.encryption import use_encryption
    from afina.training.checkpoints import latest_checkpoint
    from afina.training.loop import stop_when, train
    from afina.training.objectives import token_objective
    from tests.scripted import ScriptedObjective
    from tests.training.test_training import config, examples, lora_model

    monkeypatch.setattr(afina.sealing, "_handed_down", afina.sealing.PlainFiles())  # restored afterwards
    use_encryption()  # the test drives the training loop itself, so it hands the encryption down as afina's commands do
    data = examples(tiny_tokenizer, ticket_rows)
    pad = tiny_tokenizer.pad_token_id
    straight = lora_model(tiny_model_dir)
    train(straight, data, data[:4], config(max_steps=8), tmp_path / "straight", pad, QUIET)

    cancel = threading.Event()
    stop_in_step_4 = ScriptedObjective(token_objective(256), lambda call, batch: cancel.set() if call == 4 else None)
    run = tmp_path / "interrupted"
    with stop_when(cancel):
        stopped = train(lora_model(tiny_model_dir), data, data[:4], config(max_steps=8), run, pad, QUIET,
                        objective=stop_in_step_4)
    assert stopped.status == "interrupted"
    checkpoint = latest_checkpoint(run / "checkpoints")
    assert checkpoint.step == 4
    assert all(is_encrypted(checkpoint.path / name) for name in ("trainable.safetensors", "optimizer.pt", "state.json"))
    resumed = lora_model(tiny_model_dir)
    result = train(resumed, data, data[:4], config(max_steps=8), run, pad, QUIET)
    assert result.status == "completed" and result.resumed_from == 4
    for (name, a), (_, b) in zip(trainable_parameters(straight).items(), trainable_parameters(resumed).items()):
        assert torch.equal(a, b), name


def test_a_job_through_the_api_keeps_uploads_and_runs_encrypted(tiny_model_dir, ticket_rows, tmp_path, afina_home,
                                                                 master_key_hex):
    import openai

    from afina.jobs.files import files_dir
    from afina.service.jobs_api import JobsSettings
    from tests.service.test_jobs_api import RUN, jobs_server, jsonl, wait_for_status

    body = jsonl(planted_rows(ticket_rows))
    settings = JobsSettings(max_upload_bytes=2**20, workers=1, poll_seconds=0.1, lease_seconds=30)
    with jobs_server(tmp_path, settings) as (url, key, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        uploaded = client.files.create(file=("contracts.jsonl", body), purpose="fine-tune")
        (stored,) = files_dir().iterdir()
        assert is_encrypted(stored) and client.files.content(uploaded.id).read() == body
        job = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=uploaded.id,
                                             extra_body={"afina": {**RUN, "data": {"mask_pii": True}}})
        done = wait_for_status(client, job.id, {"succeeded", "failed", "cancelled"})
        assert done.status == "succeeded", done.error
    assert leaks_in_files(afina_home) == []
    assert leaks_in_database(tmp_path / "jobs.db") == []


def test_an_export_is_kept_encrypted_and_loads_with_the_key(tiny_model_dir, ticket_rows, tmp_path, afina_home,
                                                            master_key_hex):
    from afina.export.export import export_model
    from afina.models.loading import load_model, load_tokenizer

    result = CliRunner().invoke(app, ["run", str(write_config(tmp_path, tiny_model_dir, planted_rows(ticket_rows)))])
    assert result.exit_code == 0, result.output
    run = next((afina_home / "runs").iterdir())
    before = decrypted_dirs()
    exported = export_model(str(run), "safetensors", prompts=2)
    files = [p for p in exported.directory.rglob("*") if p.is_file()]
    assert files and all(is_encrypted(p) for p in files)
    assert leaks_in_files(afina_home) == []
    model = load_model(str(exported.directory))
    assert model.name_or_path == str(exported.directory) and load_tokenizer(str(exported.directory)) is not None

    gguf = export_model(str(run), "gguf", quant="f32", verify=False, out=tmp_path / "gguf")
    assert is_encrypted(gguf.path)
    converted = load_model(str(gguf.path))  # converted once from a private copy; the conversion kept encrypted
    cached = [p for p in (afina_home / "models").rglob("*") if p.is_file()]
    assert cached and all(is_encrypted(p) for p in cached)
    for name, weights in converted.state_dict().items():
        assert torch.equal(weights, model.state_dict()[name].to(weights.dtype)), name
    assert leaks_in_files(afina_home) == [] and decrypted_dirs() == before
