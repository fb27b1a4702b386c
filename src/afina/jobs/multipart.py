"""A file upload (multipart/form-data) read as it arrives: the file's bytes are handed on in the
chunks the client sends them, never held whole in memory.

    form = StreamedForm(request.headers.get("content-type"), request.stream())
    filename = await form.file_name()              # the form is read up to the `file` part's data
    stored = await save_upload(store, form.file_chunks(), filename=filename, ...)  # to disk as it streams
    form.field("purpose")                           # any other field, small, once the chunks are done

python-multipart parses the body; this module hands the `file` part on and keeps the other fields
(each at most `MAX_FIELD_BYTES`). `file_chunks` reads the body to its end, so a field sent after the
file is known once the last chunk is handed on, before the caller keeps anything; a body that stops
short of its closing boundary, or is not multipart, is an AfinaError (`invalid_multipart`), and the
caller's cleanup of what it wrote runs as for any other failure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from afina.errors import AfinaError

FILE_FIELD = "file"
MAX_FIELD_BYTES = 64 * 2**10  # a form field beside the file (purpose): far less than this


def form_error(message: str, location: str = "file") -> AfinaError:
    return AfinaError("invalid_multipart", message, location=location,
                      hint="send the file as multipart/form-data, as the openai client and `curl -F file=@...` do")


class StreamedForm:
    """A multipart/form-data body, parsed as it is read from `body`."""

    def __init__(self, content_type: str | None, body: AsyncIterator[bytes]):
        kind, options = parse_options_header(content_type)
        if kind != b"multipart/form-data" or not options.get(b"boundary"):
            raise form_error("upload files as multipart/form-data")
        self.fields: dict[str, bytes] = {}  # the fields beside the file
        self.filename: str | None = None  # of the `file` part, once its headers are read
        self._body = body
        self._ended = False  # the closing boundary was read
        self._headers: dict[str, str] = {}
        self._header: list[bytes] = [b"", b""]  # the header being read: name, value
        self._part: str | None = None  # name of the field being read; FILE_FIELD for the file's bytes
        self._pending: list[bytes] = []  # the file's bytes parsed, not yet handed on
        self._parser = MultipartParser(options[b"boundary"], callbacks={
            "on_part_begin": self._begin_part, "on_header_field": self._header_name,
            "on_header_value": self._header_value, "on_header_end": self._end_header,
            "on_headers_finished": self._start_data, "on_part_data": self._data, "on_end": self._end})

    async def file_name(self) -> str:
        """The uploaded file's name (its last path component), reading the form up to the file's data.
        AfinaError `missing_file` when the form has no file."""
        while self.filename is None:
            if not await self._read():
                raise AfinaError("missing_file", "a file is required (multipart field `file`)", location="file")
        return Path(self.filename.replace("\\", "/")).name or "upload"

    def field(self, name: str) -> str | None:
        """A field beside the file, as text; None when the form (read so far) has none."""
        value = self.fields.get(name)
        return None if value is None else value.decode("utf-8", "replace")

    async def file_chunks(self) -> AsyncIterator[bytes]:
        """The file's bytes as they arrive; then the rest of the form is read, to its end."""
        while True:
            if self._pending:
                chunk = b"".join(self._pending)
                self._pending.clear()
                yield chunk
            if not await self._read():
                return

    async def _read(self) -> bool:
        """Parse the next piece of the body; False at its end (AfinaError if the form is cut short)."""
        try:
            piece = await anext(self._body)
        except StopAsyncIteration:
            if not self._ended:
                raise form_error("the multipart body ended before its closing boundary") from None
            return False
        try:
            self._parser.write(piece)
        except FormParserError as error:
            raise form_error(f"the multipart body cannot be parsed: {error}") from None
        return True

    # python-multipart's callbacks

    def _begin_part(self) -> None:
        self._headers, self._part = {}, None

    def _header_name(self, data: bytes, start: int, end: int) -> None:
        self._header[0] += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]

    def _end_header(self) -> None:
        name, value = self._header
        self._headers[name.decode("latin-1").lower()] = value.decode("utf-8", "replace")
        self._header = [b"", b""]

    def _start_data(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == FILE_FIELD and b"filename" in options:
            if self.filename is not None:
                raise form_error("one file per upload")
            self.filename = options[b"filename"].decode("utf-8", "replace")
        elif name == FILE_FIELD:
            raise form_error("the `file` field must be a file (with a filename)")
        else:
            self.fields[name] = b""
        self._part = name

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._part == FILE_FIELD:
            self._pending.append(bytes(data[start:end]))
        elif self._part is not None:
            value = self.fields[self._part] + data[start:end]
            if len(value) > MAX_FIELD_BYTES:
                raise form_error(f"the form field {self._part!r} is longer than {MAX_FIELD_BYTES} bytes", self._part)
            self.fields[self._part] = value

    def _end(self) -> None:
        self._ended = True
