"""libp2p's TLS 1.3 peer authentication: certificates that carry a libp2p host key.

What this module owns (the libp2p TLS spec, github.com/libp2p/specs/blob/master/tls/tls.md):
* `TlsIdentity.generate(key_pair)`: a fresh ECDSA P-256 key and a self-signed X.509
  certificate carrying the libp2p Public Key Extension (OID 1.3.6.1.4.1.53594.1.1):
  SignedKey{publicKey: the host key in libp2p's protobuf encoding, signature: the host
  key's signature over b"libp2p-tls-handshake:" + the certificate's DER
  SubjectPublicKeyInfo}. The certificate key is unrelated to the host key, as the spec
  asks; the extension is critical, as go- and rust-libp2p mark it.
* `verify_certificate(der)`: everything the spec makes a receiver check, returning the
  peer ID the certificate proves: size, DER, validity window, self-signature with a
  hash of >= 256 bits, exactly one libp2p extension, no other critical extension, the
  host key's signature. Every failure is a CertificateError with a stable reason slug.
* `client_context` / `server_context`: ssl.SSLContext objects for TLS 1.3 only, ALPN
  "libp2p", mutual authentication, each trusting exactly the certificates it is given.

Why trusting given certificates: Python's ssl has no verify callback, so OpenSSL must
chain the peer's certificate to a trust anchor or abort. fflnode learns the peer's
certificate over a Noise-authenticated libp2p stream before any TLS starts (see
fflnode.p2p.fastpath), verifies it with `verify_certificate`, and pins it as the only
anchor. OpenSSL then checks possession of the certificate key in the handshake, and the
caller compares the certificate it got with the pinned one byte for byte. OpenSSL does
not know the libp2p extension, so the contexts tell it to ignore unknown critical
extensions (X509_V_FLAG_IGNORE_CRITICAL); `verify_certificate` refuses any critical
extension other than libp2p's, which keeps the spec's rule.

Pure: no sockets, no trio. It never logs or repr()s peer data.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import ssl
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat import asn1
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID
from libp2p.crypto.keys import KeyPair, PublicKey
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID

from fflnode.errors import FflError

LIBP2P_EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.53594.1.1")
SIGNATURE_PREFIX = b"libp2p-tls-handshake:"
ALPN = "libp2p"
# An ECDSA P-256 certificate with an Ed25519 host key is ~450 bytes; an RSA-4096 host key
# (protobuf ~550 bytes, signature 512) brings it to ~1.5 KiB. Anything past 4 KiB is not
# a libp2p certificate and is refused before parsing.
MAX_CERTIFICATE_BYTES = 4096
# A libp2p protobuf public key: Ed25519 36 bytes, secp256k1 37, RSA-4096 ~550.
MAX_HOST_KEY_BYTES = 1024
MAX_HOST_SIGNATURE_BYTES = 1024
# Peers' clocks differ: a certificate is valid from an hour before it was made.
CLOCK_SKEW = dt.timedelta(hours=1)
# A certificate lives as long as the process that made it (a node makes one at start);
# go-libp2p uses 100 years for the same reason. Ten years outlives any node process.
CERTIFICATE_LIFETIME = dt.timedelta(days=3650)
# Hashes the spec allows for the certificate's self-signature (>= 256-bit output).
STRONG_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
# OpenSSL's X509_V_FLAG_IGNORE_CRITICAL: the libp2p extension is critical and unknown to
# OpenSSL; verify_certificate does the critical-extension check instead (module doc).
X509_V_FLAG_IGNORE_CRITICAL = 0x10


@asn1.sequence
class SignedKey:
    """SignedKey ::= SEQUENCE { publicKey OCTET STRING, signature OCTET STRING }"""

    public_key: bytes
    signature: bytes


class CertificateError(FflError):
    """A certificate that does not prove a libp2p peer ID; `reason` is a stable slug."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class TlsIdentity:
    """One node's TLS certificate and its key, made from (and bound to) its host key."""

    peer_id: ID
    cert_der: bytes
    cert_pem: bytes
    key_pem: bytes  # the certificate's ECDSA key, PKCS#8, unencrypted; see `chain_file`

    @classmethod
    def generate(cls, key_pair: KeyPair, now: dt.datetime | None = None) -> TlsIdentity:
        now = now or dt.datetime.now(dt.UTC)
        cert_key = ec.generate_private_key(ec.SECP256R1())
        spki = cert_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        signed = SignedKey(
            public_key=key_pair.public_key.serialize(),
            signature=key_pair.private_key.sign(SIGNATURE_PREFIX + spki),
        )
        # A random serial number in the subject, as go-libp2p does: certificates made by
        # different nodes never share a subject, so OpenSSL's anchor lookup by subject
        # name finds exactly one candidate.
        serial = x509.random_serial_number()
        name = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, str(serial))])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(cert_key.public_key())
            .serial_number(serial)
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CERTIFICATE_LIFETIME)
            .add_extension(
                x509.UnrecognizedExtension(LIBP2P_EXTENSION_OID, asn1.encode_der(signed)),
                critical=True,
            )
            .sign(cert_key, hashes.SHA256())
        )
        key_pem = cert_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cls(
            peer_id=ID.from_pubkey(key_pair.public_key),
            cert_der=cert.public_bytes(serialization.Encoding.DER),
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key_pem,
        )

    @contextmanager
    def chain_file(self) -> Iterator[Path]:
        """Key and certificate as a path for SSLContext.load_cert_chain, which reads only
        files: an anonymous memory file (memfd) where the kernel has them, so the key
        never reaches a disk and vanishes with the process, even on SIGKILL; elsewhere a
        0600 file in a private temporary directory, removed on exit."""
        data = self.key_pem + self.cert_pem
        if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
            fd = os.memfd_create("fflnode-libp2p-tls", os.MFD_CLOEXEC)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                yield Path(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            return
        directory = tempfile.mkdtemp(prefix="fflnode-tls-")  # mode 0700
        try:
            path = Path(directory) / "chain.pem"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            yield path
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def verify_certificate(der: bytes, now: dt.datetime | None = None) -> ID:
    """The peer ID that certificate `der` proves, or CertificateError (spec checks)."""
    if len(der) > MAX_CERTIFICATE_BYTES:
        raise CertificateError("oversized", f"{len(der)} bytes > {MAX_CERTIFICATE_BYTES}")
    try:
        with warnings.catch_warnings():  # a hostile peer must not fill the log with them
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            cert = x509.load_der_x509_certificate(der)
    except Exception:  # ValueError, x509.InvalidVersion (not a ValueError), ...: found by
        # tests/test_fastpath.py's certificate fuzzing
        raise CertificateError("der", "not a DER X.509 certificate") from None
    now = now or dt.datetime.now(dt.UTC)
    try:
        not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    except Exception:  # ValueError on malformed times
        raise CertificateError("der", "unreadable validity") from None
    if not (not_before <= now <= not_after):
        raise CertificateError("validity", "certificate not valid now (expired or not yet)")
    _check_self_signature(cert)
    signed = _libp2p_extension(cert)
    host_key = _host_key(signed.public_key)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        ok = host_key.verify(SIGNATURE_PREFIX + spki, signed.signature)
    except Exception:  # libp2p's key classes raise assorted types on malformed signatures
        ok = False
    if not ok:
        raise CertificateError("signature", "host key signature over the certificate key")
    return ID.from_pubkey(host_key)


def _check_self_signature(cert: x509.Certificate) -> None:
    try:
        algorithm = cert.signature_hash_algorithm
    except Exception:  # UnsupportedAlgorithm for unknown signature OIDs
        algorithm = None
    try:
        key = cert.public_key()
    except Exception:  # ValueError / UnsupportedAlgorithm for unknown or broken keys
        raise CertificateError("algorithm", "unreadable certificate key") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        pass  # Ed25519 has its own hash (SHA-512)
    elif not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) or not isinstance(
        algorithm, STRONG_HASHES
    ):
        raise CertificateError("algorithm", "certificate key or hash not allowed by libp2p TLS")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise CertificateError("self-signature", "certificate is not validly self-signed") from None


def _libp2p_extension(cert: x509.Certificate) -> SignedKey:
    try:
        extensions = list(cert.extensions)
    except Exception:  # cryptography raises on duplicate or malformed known extensions
        raise CertificateError("extension", "malformed or duplicate extensions") from None
    found = [e for e in extensions if e.oid == LIBP2P_EXTENSION_OID]
    if len(found) != 1:
        raise CertificateError("extension", f"{len(found)} libp2p key extensions, need 1")
    if any(e.critical and e.oid != LIBP2P_EXTENSION_OID for e in extensions):
        raise CertificateError("extension", "an unknown critical extension")
    value = found[0].value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise CertificateError("extension", "libp2p extension parsed as a known type")
    try:
        signed = asn1.decode_der(SignedKey, value.value)
    except ValueError:
        raise CertificateError("extension", "libp2p extension is not a SignedKey") from None
    if len(signed.public_key) > MAX_HOST_KEY_BYTES:
        raise CertificateError("extension", "host key too large")
    if len(signed.signature) > MAX_HOST_SIGNATURE_BYTES:
        raise CertificateError("extension", "host key signature too large")
    return signed


def _host_key(encoded: bytes) -> PublicKey:
    try:
        return deserialize_public_key(encoded)
    except Exception:  # protobuf DecodeError, ValueError, unknown key types
        raise CertificateError("host-key", "not a libp2p protobuf public key") from None


def _context(purpose: ssl.Purpose, chain_file: Path, trusted: list[bytes]) -> ssl.SSLContext:
    server = purpose is ssl.Purpose.CLIENT_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # peers are identified by certificate, never by name
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual authentication on both sides
    ctx.verify_flags |= X509_V_FLAG_IGNORE_CRITICAL
    ctx.set_alpn_protocols([ALPN])
    if server:
        ctx.num_tickets = 0  # no session resumption: tickets would be unused records
    ctx.load_cert_chain(chain_file)
    if not trusted:
        raise ValueError("a libp2p TLS context needs at least one pinned peer certificate")
    ctx.load_verify_locations(cadata=b"".join(trusted))
    return ctx


def client_context(chain_file: Path, server_cert: bytes) -> ssl.SSLContext:
    """TLS 1.3 client context presenting our certificate, trusting only `server_cert`."""
    return _context(ssl.Purpose.SERVER_AUTH, chain_file, [server_cert])


def server_context(chain_file: Path, client_certs: list[bytes]) -> ssl.SSLContext:
    """TLS 1.3 server context requiring a client certificate among `client_certs`."""
    return _context(ssl.Purpose.CLIENT_AUTH, chain_file, client_certs)
