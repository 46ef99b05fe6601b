"""Undo an OTLP/HTTP body's Content-Encoding a piece at a time, never more than asked for. Pure.

A gzip bomb (1 MB that inflates to 1 GiB) must cost the collector no more than
`collector.max_request_bytes`: `Inflater.feed` hands out the inflated bytes in pieces of at
most `PIECE_BYTES`, so the caller counts them and stops as soon as the request is too large,
with the rest of the stream never inflated (zlib's `max_length` + `unconsumed_tail`).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Final

from collector.decode import MalformedRequest
from schemas.errors import PermanentError

#: The largest piece one `feed` step inflates at a time.
PIECE_BYTES: Final = 256 * 1024
_GZIP: Final = 16 + zlib.MAX_WBITS
_ZLIB: Final = zlib.MAX_WBITS
_RAW_DEFLATE: Final = -zlib.MAX_WBITS


class RequestTooLarge(PermanentError):
    """The request (as sent, or once inflated) is larger than `collector.max_request_bytes`."""


class UnsupportedEncoding(PermanentError):
    """A Content-Encoding the collector does not undo (OTLP/HTTP requires gzip; deflate is also accepted)."""


class Inflater:
    """Inflates one body. `encoding` is the Content-Encoding: identity, gzip or deflate."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._stream: zlib._Decompress | None = None
        self._started = False
        self._ended = False

    def _open(self, first: bytes) -> zlib._Decompress:
        if self.encoding == "gzip":
            return zlib.decompressobj(_GZIP)
        # HTTP's "deflate" is the zlib format, but some clients send raw deflate: tell them apart by the
        # zlib header (compression method 8, header checksum divisible by 31)
        zlib_header = len(first) >= 2 and first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0
        return zlib.decompressobj(_ZLIB if zlib_header else _RAW_DEFLATE)

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """The inflated bytes of `chunk`, in pieces of at most PIECE_BYTES.

        Raises MalformedRequest when the stream is not valid for its encoding.
        """
        if self.encoding == "identity":
            if chunk:
                yield chunk
            return
        data = chunk
        while data:
            if self._ended:
                # a gzip body may hold several members one after the other; anything else after the end is junk
                if self.encoding != "gzip":
                    raise MalformedRequest(f"data after the end of the {self.encoding} stream")
                self._stream = None
                self._ended = False
            if self._stream is None:
                self._stream = self._open(data)
            stream = self._stream
            full = True
            while full:  # a full piece may leave output inside zlib even when all input was consumed
                try:
                    piece = stream.decompress(data, PIECE_BYTES)
                except zlib.error as exc:
                    raise MalformedRequest(f"body is not a valid {self.encoding} stream: {exc}") from exc
                self._started = True
                if piece:
                    yield piece
                data = stream.unconsumed_tail
                full = len(piece) == PIECE_BYTES and not stream.eof
            if stream.eof:
                self._ended = True
                data = stream.unused_data

    def finish(self) -> None:
        """Raises MalformedRequest when the body ended before its compressed stream did."""
        if self.encoding == "identity":
            return
        if not self._started:
            raise MalformedRequest(f"Content-Encoding is {self.encoding} but the body is empty")
        if not self._ended:
            raise MalformedRequest(f"the {self.encoding} stream is truncated")


def inflater_for(content_encoding: str | None) -> Inflater:
    """An Inflater for a Content-Encoding header. Raises UnsupportedEncoding."""
    encoding = (content_encoding or "identity").strip().lower() or "identity"
    if encoding == "x-gzip":
        encoding = "gzip"
    if encoding not in ("identity", "gzip", "deflate"):
        raise UnsupportedEncoding(f"unsupported Content-Encoding {content_encoding!r}; use gzip, deflate or none")
    return Inflater(encoding)


__all__ = ["PIECE_BYTES", "Inflater", "RequestTooLarge", "UnsupportedEncoding", "inflater_for"]
