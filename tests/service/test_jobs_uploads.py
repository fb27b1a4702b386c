"""Uploads stream to disk as they arrive: the bytes are on disk before the request ends, the size
limit is enforced while streaming (no Content-Length needed), and a failure at any point (too
large, a bad purpose after the file, a body cut short, a client gone mid-upload) leaves no file and
no row behind."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx2 as httpx
import pytest

from afina.jobs.files import files_dir
from afina.service.jobs_api import JobsSettings
from tests.service.test_jobs_api import jobs_server, jsonl, stored_files

BOUNDARY = "afina-test-boundary"
CHUNK = 64 * 2**10


@pytest.fixture
def server(tmp_path, afina_home):
    with jobs_server(tmp_path, JobsSettings(max_upload_bytes=4 * 2**20)) as running:
        yield running


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


def closing() -> bytes:
    return f"--{BOUNDARY}--\r\n".encode()


def post_form(server, body, **headers) -> httpx.Response:
    """POST /v1/files with a hand-made multipart body (an iterable is sent chunked, no Content-Length)."""
    url, key, _ = server
    return httpx.post(f"{url}/v1/files", content=body, timeout=60, headers={
        "Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **headers})


def rows(count: int) -> bytes:
    return jsonl({"messages": [{"role": "user", "content": f"ticket {i} " + "x" * 200},
                               {"role": "assistant", "content": json.dumps({"n": i})}]} for i in range(count))


def nothing_kept(server) -> bool:
    return stored_files() == [] and server[2].list_files() == []


def temporary_bytes() -> int:
    """Bytes in upload temporaries now; one removed between listing and measuring counts as none."""
    total = 0
    for path in files_dir().glob(".upload-*") if files_dir().exists() else ():
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


def test_an_upload_is_on_disk_before_its_request_ends(server):
    content = rows(12_000)  # about 3 MiB
    chunks = [content[i:i + CHUNK] for i in range(0, len(content), CHUNK)]
    seen_on_disk = []

    def body() -> Iterator[bytes]:
        yield part("purpose", b"fine-tune")
        yield part("file", b"", "tickets.jsonl")[:-2]  # the part's headers; its bytes follow
        for index, chunk in enumerate(chunks):
            if index == len(chunks) // 2:  # half sent: the server has written what it received
                deadline = time.monotonic() + 10
                while temporary_bytes() < (index - 1) * CHUNK and time.monotonic() < deadline:
                    time.sleep(0.01)
                seen_on_disk.append(temporary_bytes())
            yield chunk
        yield b"\r\n" + closing()

    answer = post_form(server, body())
    assert answer.status_code == 200, answer.text
    assert seen_on_disk[0] >= (len(chunks) // 2 - 1) * CHUNK  # streamed, not held until the end
    stored = server[2].get_file(answer.json()["id"])
    assert stored.bytes == len(content) and temporary_bytes() == 0


def test_the_size_limit_holds_while_streaming_without_a_declared_length(server):
    on_disk = []

    def endless() -> Iterator[bytes]:
        yield part("purpose", b"fine-tune") + part("file", b"", "big.jsonl")[:-2]
        for _ in range(200):  # 12.5 MiB against a 4 MiB limit
            on_disk.append(temporary_bytes())
            yield rows(300)[:CHUNK]

    try:
        answer = post_form(server, endless())
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "file_too_large"
    except httpx.TransportError:  # the server answered and closed while the client was still sending
        pass
    assert 0 < max(on_disk) <= 4 * 2**20  # written as it came, and never past the limit
    assert nothing_kept(server) and temporary_bytes() == 0


def open_upload(server, length: int) -> socket.socket:
    """A raw connection with an upload's request head sent, declaring `length` bytes of body."""
    url, key, _ = server
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=10)
    connection.sendall(f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                       f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                       f"Content-Length: {length}\r\n\r\n".encode())
    return connection


def test_a_declared_length_past_the_limit_is_refused_before_reading(server):
    with open_upload(server, 5 * 2**20) as connection:  # not one byte of the body sent
        assert connection.recv(100).startswith(b"HTTP/1.1 413")
    assert nothing_kept(server)


@pytest.mark.parametrize("body, code", [
    (part("file", rows(10), "t.jsonl") + part("purpose", b"assistants") + closing(), "invalid_purpose"),
    (part("file", rows(10), "t.jsonl") + closing(), "invalid_purpose"),
    (part("purpose", b"fine-tune") + part("file", rows(10), "t.jsonl"), "invalid_multipart"),  # cut short
    (part("purpose", b"fine-tune") + closing(), "missing_file"),
    (part("purpose", b"fine-tune") + part("file", rows(10)) + closing(), "invalid_multipart"),  # no filename
    (part("purpose", b"fine-tune") + part("file", b'{"prompt": 3}\n', "t.jsonl") + closing(), None),  # invalid rows
])
def test_a_failed_upload_leaves_nothing_behind(server, body, code):
    answer = post_form(server, body)
    assert answer.status_code == 400, answer.text
    assert code is None or answer.json()["error"]["code"] == code
    assert nothing_kept(server) and temporary_bytes() == 0


def test_an_upload_that_is_not_multipart_is_refused(server):
    url, key, _ = server
    answer = httpx.post(f"{url}/v1/files", content=rows(2), headers={"Authorization": f"Bearer {key}",
                                                                     "Content-Type": "application/jsonl"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_multipart"
    assert nothing_kept(server)


def test_a_client_gone_mid_upload_leaves_nothing_behind(server):
    with open_upload(server, 3 * 2**20) as connection:
        connection.sendall(part("purpose", b"fine-tune") + part("file", b"", "t.jsonl")[:-2] + rows(2000))
        deadline = time.monotonic() + 10
        while temporary_bytes() == 0 and time.monotonic() < deadline:  # the upload is under way
            time.sleep(0.01)
        assert temporary_bytes() > 0
    deadline = time.monotonic() + 10
    while temporary_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nothing_kept(server) and temporary_bytes() == 0
