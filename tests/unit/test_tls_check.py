"""``corral check`` (and ``corral serve``) on each bad TLS input: each is refused with
a message naming the file and what is wrong with it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from corral.bench.certs import authority, server_cert
from corral.cli import main
from corral.config import ConfigError, load_settings

NOW = dt.datetime.now(dt.UTC)


def _check(tmp_path: Path, tls: str, listen: str = "127.0.0.1:8443") -> tuple[int, str]:
    config = tmp_path / "corral.yaml"
    config.write_text(f"listen: {listen}\ntls: {tls}\n")
    result = CliRunner().invoke(main, ["check", "-q", "-c", str(config)])
    return result.exit_code, result.output


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Path, Path]:
    ca = authority(tmp_path)
    return server_cert(ca, tmp_path)


def test_a_good_certificate_passes_and_relative_paths_start_beside_the_config(
        tmp_path: Path, pki: tuple[Path, Path]) -> None:
    code, out = _check(tmp_path, "{cert: server.pem, key: server.key}")
    assert code == 0, out
    assert "is valid" in out and "warning" not in out


@pytest.mark.parametrize(("cert", "key", "expected"), [
    ("missing.pem", "server.key", "tls.cert: cannot read {d}/missing.pem: No such file"),
    ("server.pem", "missing.key", "tls.key: cannot read {d}/missing.key: No such file"),
    ("server.pem", "adir", "tls.key: cannot read {d}/adir: Is a directory"),
    ("garbage.pem", "server.key", "tls.cert: {d}/garbage.pem holds no PEM certificate"),
    ("server.pem", "garbage.pem", "tls.key: {d}/garbage.pem holds no PEM private key"),
    ("server.pem", "server.pem", "tls.key: {d}/server.pem holds no PEM private key"),
    ("server.pem", "other.key", "tls.key: {d}/other.key is not the key of the certificate "
                                "in {d}/server.pem"),
    ("server.pem", "locked.key", "tls.key: {d}/locked.key is encrypted"),
])
def test_unusable_files_are_refused_naming_which(tmp_path: Path, pki: tuple[Path, Path],
                                                 cert: str, key: str, expected: str) -> None:
    (tmp_path / "adir").mkdir()
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    server_cert(authority(tmp_path / "adir"), tmp_path, stem="other")
    plain = serialization.load_pem_private_key(pki[1].read_bytes(), None)
    (tmp_path / "locked.key").write_bytes(plain.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    code, out = _check(tmp_path, f"{{cert: {cert}, key: {key}}}")
    assert code == 1, out
    assert expected.format(d=tmp_path) in out
    assert "is not usable" in out


def test_expired_and_not_yet_valid_certificates_are_refused(tmp_path: Path) -> None:
    ca = authority(tmp_path)
    server_cert(ca, tmp_path, stem="old", valid_from=NOW - dt.timedelta(days=100),
                valid_until=NOW - dt.timedelta(days=1))
    server_cert(ca, tmp_path, stem="early", valid_from=NOW + dt.timedelta(days=2))
    server_cert(ca, tmp_path, stem="soon", valid_until=NOW + dt.timedelta(days=3))
    code, out = _check(tmp_path, "{cert: old.pem, key: old.key}")
    assert code == 1 and "old.pem for CN=localhost (localhost, 127.0.0.1) expired on" in out
    code, out = _check(tmp_path, "{cert: early.pem, key: early.key}")
    assert code == 1 and "is not valid before" in out
    # About to expire: valid, with a warning an operator sees.
    code, out = _check(tmp_path, "{cert: soon.pem, key: soon.key}")
    assert code == 0 and "warning: tls.cert:" in out and "expires on" in out


def test_serve_refuses_an_unusable_key_and_starts_nothing(tmp_path: Path,
                                                           pki: tuple[Path, Path]) -> None:
    server_cert(authority(tmp_path / ".."), tmp_path, stem="other")
    config = tmp_path / "corral.yaml"
    config.write_text("listen: 127.0.0.1:1\ntls: {cert: server.pem, key: other.key}\n")
    result = CliRunner().invoke(main, ["serve", "-c", str(config)])
    assert result.exit_code == 1
    assert "is not the key of the certificate" in result.output
    assert "nothing started" in result.output


def test_listen_addresses_and_tls_section(tmp_path: Path, pki: tuple[Path, Path]) -> None:
    config = tmp_path / "corral.yaml"
    config.write_text("listen: ['0.0.0.0:8443 tls', '127.0.0.1:8080']\n")
    with pytest.raises(ConfigError, match="marked tls needs a tls section"):
        load_settings(config)
    config.write_text("listen: ['0.0.0.0:8443 tls', '127.0.0.1:8080']\n"
                      "tls: {cert: server.pem, key: server.key, min_version: 1.3}\n")
    s = load_settings(config)
    assert [(x.port, x.tls) for x in s.listeners] == [(8443, True), (8080, False)]
    assert s.tls is not None and s.tls.min_version == "1.3"
    assert s.tls.cert == str(tmp_path / "server.pem")
    # With a tls section and nothing marked, every address serves HTTPS.
    config.write_text("listen: 0.0.0.0:8443\ntls: {cert: server.pem, key: server.key}\n")
    assert [x.url for x in load_settings(config).listeners] == ["https://127.0.0.1:8443"]
    for bad, message in (("['0.0.0.0:8443 tls', '0.0.0.0:8443']", "listed twice"),
                         ("'0.0.0.0:8443 https'", "host:port tls for HTTPS"),
                         ("[]", "at least one address")):
        config.write_text(f"listen: {bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_settings(config)
    config.write_text("listen: 0.0.0.0:8443\ntls: {cert: a.pem, key: b.key, "
                      "min_version: '1.1'}\n")
    with pytest.raises(ConfigError, match=r"tls\.min_version"):
        load_settings(config)
