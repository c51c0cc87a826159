"""The two key pairs of the session record, as PEM files.

The auditor's X25519 pair seals original bodies: the sidecar holds only the public half, so a sidecar
host that is broken into cannot read what it recorded. The Ed25519 pair signs checkpoints: the sidecar
holds the private half and the auditor checks the chain with the public one."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x448, x25519
from cryptography.utils import CryptographyDeprecationWarning

from extproc.errors import ConfigError

AUDITOR_KEY: Final = "auditor.key"
AUDITOR_PUB: Final = "auditor.pub"
SIGNING_KEY: Final = "signing.key"
SIGNING_PUB: Final = "signing.pub"

MAX_KEY_FILE_BYTES: Final = 64 * 1024
"""A PEM key is well under a kilobyte; reads are bounded so a wrong path (a log, a device) fails fast."""

_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")

PublicKey = x25519.X25519PublicKey | ed25519.Ed25519PublicKey


def key_id(public_key: PublicKey) -> str:
    """A short, stable name for a public key: records and checkpoints say which key they need."""
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()[:16]


def generate_keys(directory: Path) -> dict[str, Path]:
    """Write both key pairs into ``directory``; private halves are readable by the owner only.

    Existing files are never overwritten: a replaced auditor key makes every sealed body unreadable."""
    paths = {
        "auditor_key": directory / AUDITOR_KEY,
        "auditor_pub": directory / AUDITOR_PUB,
        "signing_key": directory / SIGNING_KEY,
        "signing_pub": directory / SIGNING_PUB,
    }
    for path in paths.values():
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path}: already exists; refusing to overwrite a key")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot create the key directory: {exc.strerror}") from exc
    auditor = x25519.X25519PrivateKey.generate()
    signing = ed25519.Ed25519PrivateKey.generate()
    _write_new(paths["auditor_key"], _private_pem(auditor), 0o600)
    _write_new(paths["auditor_pub"], _public_pem(auditor.public_key()), 0o644)
    _write_new(paths["signing_key"], _private_pem(signing), 0o600)
    _write_new(paths["signing_pub"], _public_pem(signing.public_key()), 0o644)
    return paths


def load_sealing_key(path: Path) -> x25519.X25519PublicKey:
    """The auditor's public key, which the sidecar seals original bodies with."""
    key = _load_public(path, "the auditor's X25519 public key")
    if not isinstance(key, x25519.X25519PublicKey):
        raise ConfigError(f"{path}: holds {_describe(key)}, expected the auditor's X25519 public key")
    return key


def load_opening_key(path: Path) -> x25519.X25519PrivateKey:
    """The auditor's private key, which opens sealed bodies; it never belongs on a sidecar host."""
    key = _load_private(path, "the auditor's X25519 private key")
    if not isinstance(key, x25519.X25519PrivateKey):
        raise ConfigError(f"{path}: holds {_describe(key)}, expected the auditor's X25519 private key")
    return key


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The sidecar's checkpoint signing key."""
    key = _load_private(path, "the Ed25519 signing key")
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path}: holds {_describe(key)}, expected an Ed25519 private (signing) key")
    return key


def load_verify_key(path: Path) -> ed25519.Ed25519PublicKey:
    """The public half of a signing key, which checks checkpoints."""
    key = _load_public(path, "the Ed25519 verify key")
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{path}: holds {_describe(key)}, expected an Ed25519 public (verify) key")
    return key


def _private_pem(key: x25519.X25519PrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_pem(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively (O_EXCL), so a file that appeared since the check is not replaced."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise ConfigError(f"{path}: already exists; refusing to overwrite a key") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the key file: {exc.strerror}") from exc
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the key file: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _read_pem(path: Path, what: str) -> tuple[bytes, bytes]:
    """The file's bytes and its PEM label (``PRIVATE KEY``, ``PUBLIC KEY``...)."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: {what} file does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from exc
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_KEY_FILE_BYTES} bytes, not a PEM key ({what} expected)")
    label = _PEM_LABEL.search(data)
    if label is None:
        raise ConfigError(f"{path}: not a PEM file ({what} expected)")
    return data, label.group(1)


@contextlib.contextmanager
def _deprecated_kinds_quiet() -> Iterator[None]:
    """Loading a key of a kind the library deprecates (DSA) warns; every such kind is refused right after,
    by name, so the warning would only bury the error that says what the file holds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


def _load_private(path: Path, what: str) -> object:
    data, label = _read_pem(path, what)
    if label == b"ENCRYPTED PRIVATE KEY":
        raise ConfigError(f"{path}: the key is encrypted; {what} must be stored unencrypted (mode 0600)")
    if label.endswith(b"PUBLIC KEY"):
        raise ConfigError(f"{path}: holds a public key, expected {what}")
    try:
        with _deprecated_kinds_quiet():
            return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path}: not a usable PEM private key ({what} expected)") from exc


def _load_public(path: Path, what: str) -> object:
    data, label = _read_pem(path, what)
    if label.endswith(b"PRIVATE KEY"):
        raise ConfigError(f"{path}: holds a private key, expected {what} (the .pub file)")
    try:
        with _deprecated_kinds_quiet():
            return serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path}: not a usable PEM public key ({what} expected)") from exc


def _describe(key: object) -> str:
    kinds: tuple[tuple[tuple[type, ...], str], ...] = (
        ((x25519.X25519PrivateKey,), "an X25519 private key"),
        ((x25519.X25519PublicKey,), "an X25519 public key"),
        ((ed25519.Ed25519PrivateKey,), "an Ed25519 private key"),
        ((ed25519.Ed25519PublicKey,), "an Ed25519 public key"),
        ((rsa.RSAPrivateKey, rsa.RSAPublicKey), "an RSA key"),
        ((ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey), "an elliptic-curve (ECDSA/ECDH) key"),
        ((ed448.Ed448PrivateKey, ed448.Ed448PublicKey), "an Ed448 key"),
        ((x448.X448PrivateKey, x448.X448PublicKey), "an X448 key"),
    )
    for types, name in kinds:
        if isinstance(key, types):
            return name
    # Any other kind is named from its class (DSAPrivateKey: "a DSA key"), so a kind the library deprecates
    # (DSA since cryptography 51) is recognised without touching its deprecated names.
    kind = type(key).__name__.removesuffix("Key").removesuffix("Private").removesuffix("Public")
    return f"a {kind} key" if kind else f"a {type(key).__name__}"
