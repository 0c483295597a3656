"""multipart/form-data bodies, parsed by python-multipart in one pass over the body, which the route has already
read in full (BodyLimitMiddleware bounds its size and time). Starlette's form parser, which this replaces on our
upload routes, spools every file part to a temporary file and awaits each chunk's write; for the small uploads
these routes take that cost about 0.09 ms a request, a third of the framework floor's whole request. A part's
bytes are one copy of that part; the body, which Starlette keeps for the request, is not copied whole."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

import python_multipart
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.exceptions import HTTPException

MAX_FIELD_BYTES = 1024 * 1024  # a text field (not a file part): as Starlette's default


@dataclass
class Part:
    """One part of the body: its field name, whether it came as a file (with a filename), and its bytes."""

    name: str = ""
    is_file: bool = False
    charset: str = "utf-8"
    size: int = 0
    # Views into the body where the data lies there (no copy until `data` is read), else copies.
    pieces: list[bytes | memoryview] = field(default_factory=list)

    @property
    def data(self) -> bytes:
        """The part's bytes: one copy, of the part only."""
        return b"".join(self.pieces)

    def text(self) -> str:
        """A text field in the body's charset; a file part (curl -F spec=@spec.json) as UTF-8."""
        if self.is_file:
            return self.data.decode("utf-8", errors="replace")
        return _decode(self.data, self.charset)


def parse_form(content_type: str, body: bytes, max_files: int, max_fields: int) -> dict[str, Part]:
    """The parts of a multipart body by field name (the last of a repeated name wins, as in `FormData.get`).

    A malformed body, or one with more parts than allowed, is a 400 with the reason, as Starlette words it.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if boundary is None:
        raise HTTPException(400, "Missing boundary in multipart.")
    reader = _Reader(body, _charset(params.get(b"charset")), max_files, max_fields)
    try:
        parser = python_multipart.MultipartParser(boundary, reader.callbacks())
        parser.write(body)
        parser.finalize()
    except FormParserError:
        raise HTTPException(400, "Invalid multipart data.") from None
    form: dict[str, Part] = {}
    for part in reader.parts:
        form[part.name] = part
    return form


def _charset(value: bytes | None) -> str:
    try:
        return codecs.lookup((value or b"utf-8").decode("latin-1")).name
    except LookupError:
        return "latin-1"


class _Reader:
    def __init__(self, body: bytes, charset: str, max_files: int, max_fields: int) -> None:
        self.body = body
        self.charset = charset
        self.max_files = max_files
        self.max_fields = max_fields
        self.parts: list[Part] = []
        self._files = 0
        self._fields = 0
        self._part = Part()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""

    def callbacks(self) -> python_multipart.multipart.MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self._part = Part(charset=self.charset)
        self._disposition = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise HTTPException(400, 'The Content-Disposition header field "name" must be provided.')
        self._part.name = _decode(name, self.charset)
        self._part.is_file = b"filename" in options
        if self._part.is_file:
            self._files += 1
            if self._files > self.max_files:
                raise HTTPException(400, f"Too many files. Maximum number of files is {self.max_files}.")
        else:
            self._fields += 1
            if self._fields > self.max_fields:
                raise HTTPException(400, f"Too many fields. Maximum number of fields is {self.max_fields}.")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._part.size += end - start
        if not self._part.is_file and self._part.size > MAX_FIELD_BYTES:
            raise HTTPException(400, f"Part exceeded maximum size of {MAX_FIELD_BYTES // 1024}KB.")
        # The body is immutable and outlives the parts: a view of it is safe. Anything else (the parser's own
        # look-behind buffer) is copied.
        self._part.pieces.append(memoryview(data)[start:end] if data is self.body else bytes(data[start:end]))

    def on_part_end(self) -> None:
        self.parts.append(self._part)


def _decode(raw: bytes, charset: str) -> str:
    try:
        return raw.decode(charset)
    # UnicodeError: bytes the charset cannot decode, or a codec that decodes nothing ("undefined") or only some
    # text ("punycode", "idna"), which raise it plain, not as a UnicodeDecodeError (Starlette's parser lets those
    # through: a 500); LookupError: a codec that is not a text encoding (base64, say)
    except (UnicodeError, LookupError):
        return raw.decode("latin-1")
