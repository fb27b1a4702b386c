"""The lower layers seal files through what the process was handed (`afina.sealing`), and fail
closed: with a master key set and no encryption handed down, nothing is left plain and a sealed file
is refused with one clear error, never read as garbage."""

from __future__ import annotations

import secrets

import pytest
import torch

import afina.sealing
from afina.errors import AfinaError
from afina.sealing import PlainFiles, is_sealed, sealed_files
from afina.security.encryption import ENCRYPTED_FILES, use_encryption
from afina.training.checkpoints import latest_checkpoint, restore_checkpoint, save_checkpoint


@pytest.fixture
def nothing_handed_down(monkeypatch):
    monkeypatch.setattr(afina.sealing, "_handed_down", PlainFiles())  # the default; the previous one restored after


@pytest.fixture
def master_key(monkeypatch):
    monkeypatch.setenv("AFINA_MASTER_KEY", secrets.token_hex(32))
    monkeypatch.delenv("AFINA_MASTER_KEY_FILE", raising=False)


def training_state():
    weight = torch.nn.Parameter(torch.arange(4, dtype=torch.float32))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return {"weight": weight}, optimizer, scheduler


def save(directory, step=1):
    trainable, optimizer, scheduler = training_state()
    return save_checkpoint(directory, step, trainable, optimizer, scheduler, {"epoch": 0}, keep=2)


def test_with_a_master_key_and_nothing_handed_down_a_checkpoint_is_refused_and_nothing_left(
        tmp_path, nothing_handed_down, master_key):
    with pytest.raises(AfinaError) as raised:
        save(tmp_path / "checkpoints")
    assert raised.value.code == "encryption_not_set_up" and "use_encryption" in raised.value.render()
    assert [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()] == []  # no plain weights behind


def test_handed_down_encryption_seals_a_checkpoint_and_only_it_reads_it_back(tmp_path, nothing_handed_down,
                                                                              master_key):
    use_encryption()
    assert sealed_files() is ENCRYPTED_FILES
    path = save(tmp_path / "checkpoints", step=3)
    assert all(is_sealed(path / name) for name in ("trainable.safetensors", "optimizer.pt", "state.json"))
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    trainable, optimizer, scheduler = training_state()
    with torch.no_grad():
        trainable["weight"].zero_()
    restore_checkpoint(checkpoint, trainable, optimizer, scheduler)
    assert checkpoint.step == 3 and torch.equal(trainable["weight"], torch.arange(4, dtype=torch.float32))

    afina.sealing.use_sealed_files(PlainFiles())  # a process that was handed nothing: a clear refusal
    with pytest.raises(AfinaError) as raised:
        latest_checkpoint(tmp_path / "checkpoints")
    assert raised.value.code == "encryption_not_set_up"


def test_without_a_master_key_the_plain_default_writes_and_reads_plain_files(tmp_path, nothing_handed_down,
                                                                            monkeypatch):
    monkeypatch.delenv("AFINA_MASTER_KEY", raising=False)
    monkeypatch.delenv("AFINA_MASTER_KEY_FILE", raising=False)
    path = save(tmp_path / "checkpoints", step=2)
    assert not any(is_sealed(p) for p in path.iterdir())
    assert latest_checkpoint(tmp_path / "checkpoints").step == 2


def test_a_sealed_file_without_a_key_names_the_missing_key(tmp_path, nothing_handed_down, master_key, monkeypatch):
    use_encryption()
    path = save(tmp_path / "checkpoints")
    monkeypatch.delenv("AFINA_MASTER_KEY")
    for files in (PlainFiles(), ENCRYPTED_FILES):
        with pytest.raises(AfinaError) as raised:
            files.read_bytes(path / "state.json")
        assert raised.value.code == "master_key_missing"


def test_afina_commands_hand_the_encryption_down(afina_home, nothing_handed_down):
    from typer.testing import CliRunner

    from afina.cli.main import app

    assert isinstance(sealed_files(), PlainFiles)
    result = CliRunner().invoke(app, ["runs", "list"])
    assert result.exit_code == 0, result.output
    assert sealed_files() is ENCRYPTED_FILES
