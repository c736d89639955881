"""HTTPS: the certificate and key, read and checked, and re-read on reload.

``load`` builds a server ``SSLContext`` or raises :class:`TlsError` naming the file
at fault — a missing or unreadable file, a file with no PEM certificate or key, a
key that does not match its certificate. ``problems`` adds what ``corral check``
also refuses: a certificate that has expired or is not valid yet. A reload builds
a new context; connections already open keep theirs (a stream is never cut by a
certificate renewal), new connections get the new one (``listen.py`` reads
``Certificates.context`` at each handshake).
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from corral.config import TlsConfig

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# Warn ahead of expiry: long enough for a renewal that failed silently to be noticed.
EXPIRY_WARNING = dt.timedelta(days=14)


class TlsError(Exception):
    """A TLS file that cannot be used; the message names it."""


@dataclass(frozen=True, slots=True)
class CertInfo:
    subject: str
    names: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"tls.{what}: cannot read {path}: {exc.strerror}") from None


def inspect(cfg: TlsConfig) -> CertInfo:
    """The leaf certificate's subject, names and validity, or TlsError."""
    try:
        chain = x509.load_pem_x509_certificates(_read(cfg.cert, "cert"))
    except ValueError:
        raise TlsError(f"tls.cert: {cfg.cert} holds no PEM certificate "
                       "(-----BEGIN CERTIFICATE-----)") from None
    leaf = chain[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(str(n.value) for n in san)
    except x509.ExtensionNotFound:
        names = ()
    return CertInfo(leaf.subject.rfc4514_string(), names,
                    leaf.not_valid_before_utc, leaf.not_valid_after_utc)


def _check_key(cfg: TlsConfig) -> None:
    try:
        serialization.load_pem_private_key(_read(cfg.key, "key"), password=None)
    except TypeError:
        raise TlsError(f"tls.key: {cfg.key} is encrypted: Corral needs the key without "
                       "a passphrase (openssl pkey -in KEY -out PLAIN)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsError(f"tls.key: {cfg.key} holds no PEM private key "
                       "(-----BEGIN PRIVATE KEY-----)") from None


def load(cfg: TlsConfig) -> ssl.SSLContext:
    """A server context for ``cfg``, or TlsError naming the file at fault."""
    inspect(cfg)
    _check_key(cfg)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    ctx.set_alpn_protocols(["http/1.1"])     # Corral speaks HTTP/1.1, as Ollama does
    try:
        ctx.load_cert_chain(cfg.cert, cfg.key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise TlsError(f"tls.key: {cfg.key} is not the key of the certificate in "
                           f"{cfg.cert}") from None
        raise TlsError(f"tls: {cfg.cert} with {cfg.key}: {exc.reason or exc}") from None
    return ctx


def problems(cfg: TlsConfig, now: dt.datetime) -> tuple[list[str], list[str]]:
    """(errors, warnings) for ``corral check``: what ``load`` refuses, an expired
    or not yet valid certificate, and one about to expire."""
    try:
        load(cfg)
        info = inspect(cfg)
    except TlsError as exc:
        return [str(exc)], []
    when = f"{info.subject}{' (' + ', '.join(info.names) + ')' if info.names else ''}"
    if now >= info.not_after:
        return [f"tls.cert: the certificate in {cfg.cert} for {when} expired on "
                f"{info.not_after:%Y-%m-%d %H:%M} UTC"], []
    if now < info.not_before:
        return [f"tls.cert: the certificate in {cfg.cert} for {when} is not valid before "
                f"{info.not_before:%Y-%m-%d %H:%M} UTC"], []
    if info.not_after - now < EXPIRY_WARNING:
        return [], [f"tls.cert: the certificate in {cfg.cert} expires on "
                    f"{info.not_after:%Y-%m-%d %H:%M} UTC"]
    return [], []


class Certificates:
    """The context new handshakes use; ``reload`` swaps it whole, or not at all."""

    def __init__(self, cfg: TlsConfig) -> None:
        self.cfg = cfg
        self.context = load(cfg)
        self.info = inspect(cfg)

    def reload(self, cfg: TlsConfig) -> None:
        context, info = load(cfg), inspect(cfg)
        self.cfg, self.context, self.info = cfg, context, info
