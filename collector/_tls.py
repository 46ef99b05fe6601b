"""Server-side TLS for both OTLP receivers from `collector.tls` (the OTel Collector's option names)."""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc

from schemas.config import TlsConfig
from schemas.errors import ConfigError


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"collector.tls.{key}: cannot read {path}: {exc.strerror}"], "collector") from exc


def http_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """The OTLP/HTTP server's TLS context. Raises ConfigError naming the key of a file that is missing or wrong."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    for key, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file)):
        _read(path, key)  # a clear error for a missing file before ssl's terse one
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except ssl.SSLError as exc:
        raise ConfigError([f"collector.tls.cert_file / key_file: not a certificate and its key: {exc}"],
                          "collector") from exc
    if tls.client_ca_file:
        _read(tls.client_ca_file, "client_ca_file")
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except ssl.SSLError as exc:
            raise ConfigError([f"collector.tls.client_ca_file: not a CA certificate: {exc}"], "collector") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def grpc_server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """The OTLP/gRPC server's credentials; with client_ca_file, client certificates are required.

    grpc negotiates TLS 1.2 or 1.3 and its Python API cannot raise that minimum, so with
    `min_version: "1.3"` each call is checked instead (`tls_version_refusal`).
    """
    client_ca = _read(tls.client_ca_file, "client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file, "key_file"), _read(tls.cert_file, "cert_file"))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


_TLS_VERSIONS = {b"TLSv1.2": "1.2", b"TLSv1.3": "1.3"}


def tls_version_refusal(auth_context: Mapping[str, Iterable[bytes]], min_version: str) -> str | None:
    """Why a gRPC call's connection is below `min_version` (from grpc's auth context), or None if it is not."""
    if min_version != "1.3":
        return None  # grpc never negotiates below TLS 1.2
    negotiated = next(iter(auth_context.get("ssl_tls_version", ())), b"")
    if _TLS_VERSIONS.get(negotiated) == "1.3":
        return None
    return (f"collector.tls.min_version is 1.3; this connection negotiated "
            f"{negotiated.decode(errors='replace') or 'an unknown TLS version'}")
