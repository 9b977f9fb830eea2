"""The dev CA: a local certificate authority and one certificate per identity
of the mesh, under `<state_dir>/tls/`, for `make up`, `make demo`, the tests
and `triplane certs dev`.

Each certificate carries its identity as a SPIFFE-style URI SAN
(`spiffe://<trust_domain>/<identity>`: gateway, money_plane, policy_plane,
ai_plane, admin) and DNS/IP SANs for localhost, 127.0.0.1 and ::1, is good
for both server and client authentication, and is signed by the dev CA
(ECDSA P-256). Key files are written 0600, every file atomically (a temporary
file renamed over the old), so a plane reloading them never reads half a file.

`ensure_dev_certificates` creates what is missing and renews a certificate
with less than a third of its life left, or one the CA did not sign (a CA
re-created); the CA itself is kept, so certificates already handed out stay
valid. `renew` re-issues certificates on demand (a rotation, which running
planes pick up without a restart).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from triplane.runtime.config import TlsConfig
from triplane.runtime.tls import CA_CERT_FILE, CA_KEY_FILE, IDENTITIES, spiffe_id, tls_dir

# A dev CA outlives the certificates it signs by far (as mkcert's does).
CA_LIFETIME_DAYS = 3650
# Issued a little in the past, so a clock a few minutes behind still accepts it.
BACKDATE = datetime.timedelta(minutes=5)
LOCAL_DNS = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Authority:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    identity: str
    cert_path: Path
    key_path: Path
    spiffe_id: str
    not_after: datetime.datetime
    created: bool


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def new_authority(
    common_name: str = "Triplane dev CA",
    not_before: datetime.datetime | None = None,
    lifetime: datetime.timedelta = datetime.timedelta(days=CA_LIFETIME_DAYS),
) -> Authority:
    """A self-signed CA (not written anywhere)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = (not_before or _now()) - BACKDATE
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(certificate, key)


def issue(
    authority: Authority,
    identity_uri: str,
    *,
    not_before: datetime.datetime | None = None,
    lifetime: datetime.timedelta = datetime.timedelta(days=30),
    dns_names: Sequence[str] = LOCAL_DNS,
    ip_addresses: Sequence[str] = LOCAL_IPS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for one identity (server and client authentication)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = (not_before or _now()) - BACKDATE
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity_uri)]
    names += [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity_uri.rsplit("/", 1)[-1])])
        )
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
            critical=False,
        )
        .sign(authority.key, hashes.SHA256())
    )
    return certificate, key


def write_pair(
    cert_path: Path, key_path: Path, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    """Writes a certificate and its key (0600), key first: a reader that sees
    the new certificate beside the old key waits for the pair to match."""
    cert_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_atomic(key_path, _key_pem(key), 0o600)
    _write_atomic(cert_path, _pem(certificate), 0o644)


def load_authority(directory: Path) -> Authority | None:
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    if not (cert_path.is_file() and key_path.is_file()):
        return None
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: not an EC key")
    return Authority(certificate, key)


def _ensure_authority(directory: Path, now: datetime.datetime) -> tuple[Authority, bool]:
    authority = load_authority(directory)
    if authority is not None and authority.certificate.not_valid_after_utc > now:
        return authority, False
    authority = new_authority(not_before=now)
    write_pair(
        directory / CA_CERT_FILE, directory / CA_KEY_FILE, authority.certificate, authority.key
    )
    return authority, True


def _needs_renewal(
    cert_path: Path,
    authority: Authority,
    uri: str,
    lifetime: datetime.timedelta,
    now: datetime.datetime,
) -> bool:
    """Missing, unreadable, signed by another CA, for another identity, or
    with less than a third of its lifetime left."""
    if not cert_path.is_file() or not cert_path.with_suffix(".key").is_file():
        return True
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        certificate.verify_directly_issued_by(authority.certificate)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return True
    if uri not in names.value.get_values_for_type(x509.UniformResourceIdentifier):
        return True
    return certificate.not_valid_after_utc - now < lifetime / 3


def ensure_dev_certificates(
    state_dir: Path,
    tls: TlsConfig,
    identities: Iterable[str] = IDENTITIES,
    *,
    renew: bool = False,
    now: datetime.datetime | None = None,
) -> list[Issued]:
    """The dev CA and a certificate per identity under <state_dir>/tls/:
    created when missing, renewed when due (or every one with `renew`)."""
    directory = tls_dir(state_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    moment = now or _now()
    authority, new_ca = _ensure_authority(directory, moment)
    lifetime = datetime.timedelta(days=tls.dev_cert_days)
    issued: list[Issued] = []
    for identity in identities:
        uri = spiffe_id(identity, tls.trust_domain)
        cert_path, key_path = directory / f"{identity}.crt", directory / f"{identity}.key"
        due = renew or new_ca or _needs_renewal(cert_path, authority, uri, lifetime, moment)
        if due:
            certificate, key = issue(authority, uri, not_before=moment, lifetime=lifetime)
            write_pair(cert_path, key_path, certificate, key)
        else:
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        issued.append(
            Issued(identity, cert_path, key_path, uri, certificate.not_valid_after_utc, due)
        )
    return issued
