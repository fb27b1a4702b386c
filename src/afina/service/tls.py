"""HTTPS for `afina server` and `afina serve`: uvicorn's TLS with TLS 1.2 as the minimum.

    config = uvicorn_config(app, host="0.0.0.0", port=8443, tls_cert="server.pem", tls_key="server.key")
    uvicorn.Server(config).run()

uvicorn builds its SSLContext from the certificate and key; afina then refuses anything older than
TLS 1.2, so a client that offers TLS 1.0 or 1.1 fails the handshake. TLS 1.3 is negotiated whenever
the client has it (OpenSSL prefers the highest version both sides share). A certificate or key that
cannot be read is an AfinaError before the server starts.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import uvicorn

from afina.errors import AfinaError

MINIMUM_TLS = ssl.TLSVersion.TLSv1_2


def uvicorn_config(app, *, host: str, port: int, tls_cert: Path | None = None, tls_key: Path | None = None,
                   log_level: str = "warning") -> uvicorn.Config:
    """uvicorn's configuration for `app`: plain HTTP, or HTTPS with TLS 1.2 at least when a
    certificate is given (its key in `tls_key`, or in the certificate file itself)."""
    if tls_cert is None:
        if tls_key is not None:
            raise AfinaError("tls_incomplete", "--tls-key needs --tls-cert", location="--tls-cert",
                             hint="pass the certificate (PEM) with --tls-cert as well")
        return uvicorn.Config(app, host=host, port=port, log_level=log_level)
    check_tls_files(tls_cert, tls_key)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, ssl_certfile=str(tls_cert),
                          ssl_keyfile=str(tls_key) if tls_key else None, ssl_context_factory=modern_tls)


def modern_tls(config: uvicorn.Config, default_factory) -> ssl.SSLContext:
    """uvicorn's own context (certificate, key, ALPN), with versions before TLS 1.2 refused."""
    context = default_factory()
    context.minimum_version = MINIMUM_TLS
    return context


def check_tls_files(tls_cert: Path, tls_key: Path | None) -> None:
    """The certificate and key load together, or AfinaError `tls_invalid` saying which is wrong."""
    for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path is not None and not path.is_file():
            raise AfinaError("tls_invalid", f"no file {str(path)!r}", location=flag,
                             hint="pass a PEM file readable by the server")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tls_cert, tls_key)
    except (ssl.SSLError, OSError) as e:
        raise AfinaError("tls_invalid", f"the certificate and key do not load: {e.strerror or e}",
                         location=str(tls_cert),
                         hint="pass a PEM certificate and its unencrypted PEM private key") from None


def serve_app(app, *, host: str, port: int, tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
    """Run `app` until stopped, over HTTPS when a certificate is given."""
    uvicorn.Server(uvicorn_config(app, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key)).run()


def scheme(tls_cert: Path | None) -> str:
    return "https" if tls_cert else "http"
