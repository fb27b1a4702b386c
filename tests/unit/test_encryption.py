"""Encryption at rest: sealed files read back exactly; a wrong key, a flipped byte anywhere or a cut
file fails with `decryption_failed`, never garbage; rotation re-wraps headers only; key files must be
private; without a key nothing changes."""

from __future__ import annotations

import io
import os
import secrets
import stat
import tempfile
from pathlib import Path

import pytest

from afina.errors import AfinaError
from afina.security.encryption import (
    HEADER,
    decrypted_copy,
    encrypt_file,
    encrypt_stream,
    encrypt_tree,
    is_encrypted,
    read_bytes,
    write_bytes,
)
from afina.security.master_key import MasterKey, master_key, parse_key
from afina.security.rotation import journal_path, rotate_master_key, write_header
from tests.user_errors import run

CHUNK = 16  # tiny chunks, so that a few bytes make several of them


def new_key(name: str = "test") -> MasterKey:
    return MasterKey(secrets.token_bytes(32), name)


@pytest.fixture
def key(monkeypatch) -> MasterKey:
    key = new_key()
    monkeypatch.setenv("AFINA_MASTER_KEY", key.secret.hex())
    monkeypatch.delenv("AFINA_MASTER_KEY_FILE", raising=False)
    return key


def sealed(plain: bytes, key: MasterKey, chunk_size: int = CHUNK) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(plain), out, key, chunk_size)
    return out.getvalue()


def assert_fails(path: Path, key: MasterKey | None = None) -> str:
    with pytest.raises(AfinaError) as raised:
        read_bytes(path, key)
    assert raised.value.code == "decryption_failed" and raised.value.location == str(path)
    return raised.value.message


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5])
def test_round_trip_at_every_chunk_boundary(tmp_path, size):
    key, plain = new_key(), os.urandom(size)
    path = tmp_path / "file"
    path.write_bytes(sealed(plain, key))
    assert is_encrypted(path)
    assert size < 8 or plain not in path.read_bytes()  # (a byte or two may occur in any ciphertext)
    assert read_bytes(path, key) == plain


def test_each_file_gets_its_own_data_key(tmp_path):
    key, plain = new_key(), b"the same content twice" * 4
    assert sealed(plain, key)[HEADER.size:] != sealed(plain, key)[HEADER.size:]


def test_a_flipped_byte_anywhere_fails(tmp_path):
    """Magic, version, chunk size, key id, wrap nonce, wrapped key, chunk nonces, ciphertext, tags."""
    key = new_key()
    original = sealed(b"contract clause: the buyer pays within 30 days." * 2, key)
    path = tmp_path / "file"
    for offset in range(len(original)):
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        path.write_bytes(bytes(damaged))
        if offset < 8:  # the magic itself: see the next test
            continue
        assert_fails(path, key)
    path.write_bytes(original)
    assert read_bytes(path, key) == b"contract clause: the buyer pays within 30 days." * 2


def test_a_damaged_magic_never_yields_the_content(tmp_path):
    """No longer afina's header, the file reads as the bytes it holds: ciphertext, which no reader of
    afina's files (JSON lines, safetensors) accepts."""
    key = new_key()
    path = tmp_path / "file"
    original = sealed(b"secret text", key)
    for offset in range(8):
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        path.write_bytes(bytes(damaged))
        assert not is_encrypted(path)
        assert b"secret text" not in read_bytes(path, key)  # what is read is the ciphertext, never the text


def test_a_cut_or_extended_file_fails(tmp_path):
    key = new_key()
    original = sealed(os.urandom(3 * CHUNK), key)  # cut at a chunk boundary too: the last chunk is marked
    path = tmp_path / "file"
    for length in range(1, len(original)):
        path.write_bytes(original[:length])
        assert_fails(path, key)
    path.write_bytes(original + original[-(CHUNK + 28):])  # the last chunk repeated
    assert_fails(path, key)


def test_reordered_chunks_fail(tmp_path):
    key = new_key()
    original = sealed(os.urandom(3 * CHUNK), key)
    size = CHUNK + 28
    body = original[HEADER.size:]
    chunks = [body[i:i + size] for i in range(0, len(body), size)]
    path = tmp_path / "file"
    path.write_bytes(original[:HEADER.size] + chunks[1] + chunks[0] + chunks[2])
    assert_fails(path, key)


def test_a_wrong_key_fails_and_says_so(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(sealed(b"hello", new_key()))
    assert "another master key" in assert_fails(path, new_key())


def test_a_sealed_file_without_a_key_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("AFINA_MASTER_KEY", raising=False)
    path = tmp_path / "file"
    path.write_bytes(sealed(b"hello", new_key()))
    with pytest.raises(AfinaError) as raised:
        read_bytes(path)
    assert raised.value.code == "master_key_missing"


def test_without_a_key_nothing_is_encrypted(tmp_path, monkeypatch):
    monkeypatch.delenv("AFINA_MASTER_KEY", raising=False)
    monkeypatch.delenv("AFINA_MASTER_KEY_FILE", raising=False)
    path = tmp_path / "plain.txt"
    path.write_bytes(b"plain")
    assert master_key() is None
    assert encrypt_file(path) is False and encrypt_tree(tmp_path) == 0
    write_bytes(tmp_path / "written.txt", b"written")
    assert path.read_bytes() == b"plain" and (tmp_path / "written.txt").read_bytes() == b"written"
    assert read_bytes(path) == b"plain"
    with decrypted_copy(tmp_path) as same:
        assert same == tmp_path


def test_files_are_sealed_in_place_once(tmp_path, key):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "hola"}\n')
    path.chmod(0o640)
    assert encrypt_file(path) is True
    assert is_encrypted(path) and b"hola" not in path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the file keeps its permissions
    once = path.read_bytes()
    assert encrypt_file(path) is False and path.read_bytes() == once  # never sealed twice
    assert read_bytes(path) == b'{"text": "hola"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]  # no temporary left beside it


def test_a_decrypted_copy_is_private_and_removed(tmp_path, key):
    model = tmp_path / "adapter"
    (model / "sub").mkdir(parents=True)
    (model / "weights.safetensors").write_bytes(b"weights" * 100)
    (model / "sub" / "config.json").write_text("{}")
    encrypt_tree(model)
    (model / "plain.txt").write_text("plain")
    assert is_encrypted(model / "sub" / "config.json")
    with decrypted_copy(model) as copy:
        assert copy != model
        assert stat.S_IMODE(copy.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE((copy / "weights.safetensors").stat().st_mode) == 0o600
        assert (copy / "weights.safetensors").read_bytes() == b"weights" * 100
        assert (copy / "sub" / "config.json").read_text() == "{}" and (copy / "plain.txt").read_text() == "plain"
    assert not copy.parent.exists()
    with pytest.raises(RuntimeError), decrypted_copy(model / "weights.safetensors") as single:
        assert single.read_bytes() == b"weights" * 100
        raise RuntimeError("a library failed")
    assert not single.parent.exists()
    assert not list(Path(tempfile.gettempdir()).glob(f"afina-decrypted-*/{single.name}"))


def test_a_failed_decryption_leaves_no_copy(tmp_path, key):
    model = tmp_path / "adapter"
    model.mkdir()
    (model / "weights.safetensors").write_bytes(sealed(b"x" * 40, new_key()))  # another key
    before = set(Path(tempfile.gettempdir()).glob("afina-decrypted-*"))
    with pytest.raises(AfinaError) as raised, decrypted_copy(model):
        pass
    assert raised.value.code == "decryption_failed"
    assert set(Path(tempfile.gettempdir()).glob("afina-decrypted-*")) == before


# --- rotation ---------------------------------------------------------------------------------------

def sealed_tree(root: Path, key: MasterKey) -> dict[Path, bytes]:
    files = {root / "runs" / "a" / "train.jsonl": os.urandom(100), root / "files" / "up.jsonl": os.urandom(5),
             root / "runs" / "a" / "adapter" / "w.safetensors": os.urandom(3 * CHUNK)}
    for path, plain in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sealed(plain, key))
    (root / "runs" / "a" / "metrics.jsonl").write_text("{}\n")
    return files


def test_rotation_rewraps_headers_only(tmp_path):
    old, new = new_key("old"), new_key("new")
    files = sealed_tree(tmp_path, old)
    before = {path: (path.read_bytes(), path.stat().st_ino) for path in files}
    report = rotate_master_key([tmp_path], old, new)
    assert (report.rewrapped, report.already_new, report.plain, report.failed) == (3, 0, 1, [])
    for path, plain in files.items():
        data, inode = before[path]
        after = path.read_bytes()
        assert after[HEADER.size:] == data[HEADER.size:]  # the data is not rewritten
        assert after[:HEADER.size] != data[:HEADER.size] and path.stat().st_ino == inode  # in place
        assert read_bytes(path, new) == plain
        assert "another master key" in assert_fails(path, old)
    again = rotate_master_key([tmp_path], old, new)  # a second run finds everything done
    assert (again.rewrapped, again.already_new) == (0, 3)
    assert not list(tmp_path.rglob("*.afina-rewrap"))


def test_an_interrupted_rotation_is_finished_by_running_it_again(tmp_path):
    old, new = new_key("old"), new_key("new")
    files = sealed_tree(tmp_path, old)
    path, plain = next(iter(files.items()))
    from afina.security.encryption import open_data_key, read_header, seal_data_key

    header = read_header(path)
    replacement = seal_data_key(open_data_key(header, old, path), new, header.chunk_size)
    journal_path(path).write_bytes(replacement.pack())  # the journal was synced, then the machine died
    path.write_bytes(path.read_bytes()[:40] + b"\0" * 41 + path.read_bytes()[HEADER.size:])  # a torn header
    assert_fails(path, old)
    report = rotate_master_key([tmp_path], old, new)
    assert report.failed == [] and report.rewrapped + report.already_new == 3
    assert read_bytes(path, new) == plain
    write_header(path, replacement)  # applying the same header twice is harmless
    assert read_bytes(path, new) == plain


def test_rotation_reports_files_it_cannot_open_and_leaves_them(tmp_path):
    old, new, other = new_key("old"), new_key("new"), new_key("other")
    sealed_tree(tmp_path, old)
    stranger = tmp_path / "runs" / "b.jsonl"
    stranger.write_bytes(sealed(b"other", other))
    before = stranger.read_bytes()
    report = rotate_master_key([tmp_path], old, new)
    assert report.rewrapped == 3 and [path for path, _ in report.failed] == [stranger]
    assert stranger.read_bytes() == before


def test_afina_keys_rotate(afina_home, key, monkeypatch, tmp_path):
    files = sealed_tree(afina_home, key)
    new_file = tmp_path / "new.key"
    new = new_key()
    new_file.write_text(new.secret.hex() + "\n")
    new_file.chmod(0o644)
    result = run("keys", "rotate", "--new-key-file", new_file)
    assert result.exit_code == 2 and "error[key_file_exposed]" in result.output  # refused before any work
    assert all(read_bytes(path, key) for path in files)
    new_file.chmod(0o600)
    result = run("keys", "rotate", "--new-key-file", new_file)
    assert result.exit_code == 0, result.output
    assert "re-wrapped 3 encrypted files" in result.output
    assert all(read_bytes(path, parse_key(new_file.read_bytes(), "f")) == plain for path, plain in files.items())
    monkeypatch.setenv("AFINA_NEW_MASTER_KEY", key.secret.hex())  # and back again, from the variable
    monkeypatch.setenv("AFINA_MASTER_KEY", new.secret.hex())
    result = run("keys", "rotate")
    assert result.exit_code == 0 and "re-wrapped 3" in result.output, result.output
    assert all(read_bytes(path, key) == plain for path, plain in files.items())


# --- the master key ---------------------------------------------------------------------------------

def test_key_files_must_be_private(tmp_path, monkeypatch):
    monkeypatch.delenv("AFINA_MASTER_KEY", raising=False)
    secret = secrets.token_bytes(32)
    path = tmp_path / "master.key"
    path.write_text(secret.hex())
    monkeypatch.setenv("AFINA_MASTER_KEY_FILE", str(path))
    for mode in (0o644, 0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(AfinaError) as raised:
            master_key()
        assert raised.value.code == "key_file_exposed" and "chmod 600" in raised.value.hint
        assert secret.hex() not in raised.value.render()
    path.chmod(0o600)
    assert master_key().secret == secret
    path.chmod(0o400)
    assert master_key().secret == secret


def test_bad_or_ambiguous_keys_are_refused_without_showing_them(tmp_path, monkeypatch):
    for text in ("too short", "ab" * 31, "ab" * 33, "x" * 32):
        monkeypatch.setenv("AFINA_MASTER_KEY", text)
        with pytest.raises(AfinaError) as raised:
            master_key()
        assert raised.value.code == "bad_master_key" and text not in raised.value.render()
    monkeypatch.setenv("AFINA_MASTER_KEY", "ab" * 32)
    monkeypatch.setenv("AFINA_MASTER_KEY_FILE", str(tmp_path / "k"))
    with pytest.raises(AfinaError) as raised:
        master_key()
    assert raised.value.code == "master_key_ambiguous"


def test_keys_in_hex_or_base64_are_the_same_key(monkeypatch):
    import base64

    secret = secrets.token_bytes(32)
    for text in (secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(),
                 base64.urlsafe_b64encode(secret).decode()):
        monkeypatch.setenv("AFINA_MASTER_KEY", text)
        assert master_key().secret == secret
    assert secret.hex() not in repr(master_key())
