"""The session record's format: keys, sealing, the hash chain, checkpoints, torn writes and verify."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa, x25519

from extproc.audit.keys import (
    generate_keys,
    key_id,
    load_opening_key,
    load_sealing_key,
    load_signing_key,
    load_verify_key,
)
from extproc.audit.record import (
    ZERO_HASH,
    Chain,
    RecordError,
    SealError,
    canonical,
    checkpoint_message,
    find,
    iter_records,
    open_sealed,
    read_tail,
    record_hash,
    seal,
    verify,
)
from extproc.errors import ConfigError

SIGNING = ed25519.Ed25519PrivateKey.generate()
VERIFY = SIGNING.public_key()
OTHER_SIGNING = ed25519.Ed25519PrivateKey.generate()
AUDITOR = x25519.X25519PrivateKey.generate()
TIME = "2026-01-02T03:04:05.678Z"


def exchange(i: int) -> dict[str, Any]:
    return {
        "type": "exchange",
        "id": f"r{i}",
        "time": TIME,
        "findings": {"request": [{"rule": "email", "entity": "EMAIL", "start": 3, "end": 20}]},
    }


def build(
    count: int, *, checkpoint_every: int = 0, key: ed25519.Ed25519PrivateKey = SIGNING
) -> list[dict[str, Any]]:
    """A chain as the writer makes it: a start record, ``count`` exchanges, a checkpoint every
    ``checkpoint_every`` exchanges and one at the end (when ``checkpoint_every``)."""
    chain = Chain()
    records = [chain.link({"type": "start", "time": TIME, "pid": 1})]
    for i in range(count):
        records.append(chain.link(exchange(i)))
        if checkpoint_every and (i + 1) % checkpoint_every == 0:
            records.append(chain.checkpoint(key, TIME))
    if checkpoint_every and records[-1]["type"] != "checkpoint":
        records.append(chain.checkpoint(key, TIME))
    return records


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(canonical(r) + b"\n" for r in records))
    return path


def rechain(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What an attacker without the signing key can do: renumber and rehash every record."""
    chain = Chain()
    out = []
    for record in records:
        body = {k: v for k, v in record.items() if k not in ("seq", "prev", "hash")}
        out.append(chain.link(body))
    return out


def line_of(records: list[dict[str, Any]], record_id: str) -> int:
    return next(n for n, r in enumerate(records, 1) if r.get("id") == record_id)


# -- keys ---------------------------------------------------------------------------------------------


def test_generate_keys_writes_two_pairs_that_load(tmp_path: Path) -> None:
    paths = generate_keys(tmp_path / "keys")
    assert {p.name for p in paths.values()} == {"auditor.key", "auditor.pub", "signing.key", "signing.pub"}
    assert stat.S_IMODE(paths["auditor_key"].stat().st_mode) == 0o600
    assert stat.S_IMODE(paths["signing_key"].stat().st_mode) == 0o600
    assert paths["auditor_key"].read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert paths["signing_pub"].read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    opening = load_opening_key(paths["auditor_key"])
    sealing = load_sealing_key(paths["auditor_pub"])
    signing = load_signing_key(paths["signing_key"])
    verifying = load_verify_key(paths["signing_pub"])
    assert key_id(opening.public_key()) == key_id(sealing)
    assert key_id(signing.public_key()) == key_id(verifying)
    assert len(key_id(sealing)) == 16
    int(key_id(sealing), 16)
    assert open_sealed(seal(b"body", sealing, "r1"), opening, "r1") == b"body"


def test_generate_keys_refuses_to_overwrite(tmp_path: Path) -> None:
    paths = generate_keys(tmp_path)
    before = {name: p.read_bytes() for name, p in paths.items()}
    with pytest.raises(ConfigError, match=r"auditor\.key: already exists"):
        generate_keys(tmp_path)
    assert {name: p.read_bytes() for name, p in paths.items()} == before


def test_generate_keys_refuses_when_only_one_file_exists(tmp_path: Path) -> None:
    (tmp_path / "signing.pub").write_text("mine")
    with pytest.raises(ConfigError, match=str(tmp_path / "signing.pub")):
        generate_keys(tmp_path)
    assert not (tmp_path / "auditor.key").exists()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    return generate_keys(tmp_path / "keys")


def test_loaders_reject_the_wrong_key_type(keys: dict[str, Path]) -> None:
    with pytest.raises(
        ConfigError, match=r"signing\.pub: holds an Ed25519 public key, expected the auditor's X25519"
    ):
        load_sealing_key(keys["signing_pub"])
    with pytest.raises(ConfigError, match=r"auditor\.key: holds an X25519 private key, expected an Ed25519"):
        load_signing_key(keys["auditor_key"])
    with pytest.raises(
        ConfigError, match=r"signing\.key: holds an Ed25519 private key, expected the auditor's"
    ):
        load_opening_key(keys["signing_key"])
    with pytest.raises(ConfigError, match=r"auditor\.pub: holds an X25519 public key, expected an Ed25519"):
        load_verify_key(keys["auditor_pub"])


def test_loaders_reject_a_public_key_for_a_private_one_and_back(keys: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"signing\.pub: holds a public key"):
        load_signing_key(keys["signing_pub"])
    with pytest.raises(ConfigError, match=r"auditor\.key: holds a private key"):
        load_sealing_key(keys["auditor_key"])


def test_loaders_reject_garbage_missing_and_unreadable_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key at all\n")
    with pytest.raises(ConfigError, match=f"{garbage}: not a PEM file"):
        load_signing_key(garbage)
    broken = tmp_path / "broken.pem"
    broken.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match=f"{broken}: not a usable PEM private key"):
        load_opening_key(broken)
    missing = tmp_path / "missing.pub"
    with pytest.raises(ConfigError, match=f"{missing}: .* does not exist"):
        load_verify_key(missing)
    with pytest.raises(ConfigError, match=f"{tmp_path}: cannot read"):
        load_sealing_key(tmp_path)


def test_loaders_name_an_rsa_key(tmp_path: Path) -> None:
    path = tmp_path / "rsa.key"
    path.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ConfigError, match=f"{path}: holds an RSA key"):
        load_signing_key(path)


# A DSA key (made once with cryptography 51, which deprecates DSA): loading it warns inside the library.
DSA_PRIVATE_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIBSwIBADCCASwGByqGSM44BAEwggEfAoGBAPHnRplDRmPe2vnEvcorinEpFXto
0ncY5e8wCL4bRgW5v7oezp5bCocvqRaiIg79Vo8bszqQ2Cv4EjdB1SCplE7aGO6o
XeyRsbkcMMsRjJ2QXjlVCrykHStyJCq5ZoDfxJ8PwULjutuJfGtFysl002oajbCF
Qqwjo1X05FdIn3e3AhUA4x7i+IurT5HrsJSFVOzUAsB7hBkCgYEAovUZ9n4tbsIZ
4H5Q2rZbJJNywyhD66sHttmZY+VcVWdQ34B8YUEa4IYpIhZY/N/yFt9swt74fbqu
5/QXvsBSN5PsX3B+GNL0W8tomNTAnU2eK3uYy2m1/m+v1qdHLevSPtDd5z/2tSUc
aBmhPzWHQ1IOIUgCh9zBoxpKnpdixOIEFgIUd4H9Hijjd2FI9H5pHdVLhXBqkbg=
-----END PRIVATE KEY-----
"""


def test_loaders_name_a_dsa_key_without_the_librarys_deprecation_warning(tmp_path: Path) -> None:
    """cryptography 51 deprecates DSA: naming the key must not touch the deprecated names, and the
    library's warning must not bury the error (warnings are errors in this suite)."""
    path = tmp_path / "dsa.key"
    path.write_bytes(DSA_PRIVATE_PEM)
    with pytest.raises(ConfigError, match=f"{path}: holds a DSA key, expected an Ed25519"):
        load_signing_key(path)
    with pytest.raises(ConfigError, match=f"{path}: holds a DSA key, expected the auditor's"):
        load_opening_key(path)


def test_loaders_refuse_an_encrypted_private_key(tmp_path: Path) -> None:
    path = tmp_path / "enc.key"
    path.write_bytes(
        SIGNING.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match=f"{path}: the key is encrypted"):
        load_signing_key(path)


# -- sealing ------------------------------------------------------------------------------------------


def test_seal_round_trip() -> None:
    sealed = seal(b"the original body \xe2\x9c\x93", AUDITOR.public_key(), "r1")
    assert sealed["alg"] == "hpke-x25519-sha256-chacha20poly1305"
    assert sealed["kid"] == key_id(AUDITOR.public_key())
    assert base64.b64decode(sealed["ct"], validate=True)
    assert b"original" not in base64.b64decode(sealed["ct"])
    assert open_sealed(sealed, AUDITOR, "r1") == b"the original body \xe2\x9c\x93"


def test_open_with_the_wrong_key() -> None:
    sealed = seal(b"body", AUDITOR.public_key(), "r1")
    with pytest.raises(SealError, match="sealed for key"):
        open_sealed(sealed, x25519.X25519PrivateKey.generate(), "r1")


def test_open_with_the_wrong_record_id() -> None:
    sealed = seal(b"body", AUDITOR.public_key(), "r1")
    with pytest.raises(SealError, match="does not open for record 'r2'"):
        open_sealed(sealed, AUDITOR, "r2")


def test_open_a_flipped_ciphertext_byte() -> None:
    sealed = seal(b"body", AUDITOR.public_key(), "r1")
    raw = bytearray(base64.b64decode(sealed["ct"]))
    raw[-3] ^= 0x01
    with pytest.raises(SealError, match="altered"):
        open_sealed({**sealed, "ct": base64.b64encode(bytes(raw)).decode()}, AUDITOR, "r1")


def test_open_rejects_an_unknown_algorithm_and_bad_base64() -> None:
    sealed = seal(b"body", AUDITOR.public_key(), "r1")
    with pytest.raises(SealError, match="unsupported sealing algorithm"):
        open_sealed({**sealed, "alg": "rot13"}, AUDITOR, "r1")
    with pytest.raises(SealError, match="not valid base64"):
        open_sealed({**sealed, "ct": "!!!"}, AUDITOR, "r1")
    with pytest.raises(SealError, match="altered"):
        open_sealed({**sealed, "ct": "AAAA"}, AUDITOR, "r1")


# -- the chain ----------------------------------------------------------------------------------------


def test_canonical_form() -> None:
    assert canonical({"b": 1, "a": ["é", None]}) == b'{"a":["\\u00e9",null],"b":1}'
    with pytest.raises(ValueError, match="JSON compliant"):
        canonical({"x": float("nan")})


def test_canonical_form_takes_a_lone_surrogate(tmp_path: Path) -> None:
    # A header decoded with surrogateescape: not encodable as UTF-8, but it must not cost the record.
    assert canonical({"h": "r\udcff"}) == b'{"h":"r\\udcff"}'
    chain = Chain()
    records = [
        chain.link({"type": "start", "time": TIME, "pid": 1}),
        chain.link({**exchange(1), "headers": {"x-name": "r\udcff", "x-other": "é\ud800"}}),
    ]
    path = write(tmp_path / "r.jsonl", records)
    assert path.read_bytes().isascii()
    report = verify(path)
    assert report.ok, report.first_break
    found = find(path, "r1")
    assert found is not None
    assert found["headers"] == {"x-name": "r\udcff", "x-other": "é\ud800"}


def test_link_adds_seq_prev_and_hash() -> None:
    chain = Chain()
    first = chain.link({"type": "start"})
    second = chain.link({"type": "exchange", "id": "r1"})
    assert (first["seq"], first["prev"]) == (0, ZERO_HASH)
    assert (second["seq"], second["prev"]) == (1, first["hash"])
    assert (
        second["hash"]
        == hashlib.sha256(canonical({k: v for k, v in second.items() if k != "hash"})).hexdigest()
    )
    assert second["hash"] == record_hash(second)
    assert (chain.seq, chain.last_hash) == (2, second["hash"])


def test_link_refuses_bad_bodies_and_stays_put() -> None:
    chain = Chain()
    chain.link({"type": "start"})
    state = (chain.seq, chain.last_hash)
    with pytest.raises(ValueError, match="type"):
        chain.link({"id": "x"})
    with pytest.raises(ValueError, match="seq"):
        chain.link({"type": "exchange", "seq": 9})
    with pytest.raises(TypeError):
        chain.link({"type": "exchange", "value": {1, 2}})
    assert (chain.seq, chain.last_hash) == state


def test_checkpoint_signs_its_seq_and_prev() -> None:
    chain = Chain()
    chain.link({"type": "start"})
    prev = chain.last_hash
    checkpoint = chain.checkpoint(SIGNING, TIME)
    assert checkpoint["type"] == "checkpoint"
    assert checkpoint["signed"] == {"seq": 1, "prev": prev}
    assert (checkpoint["seq"], checkpoint["prev"], checkpoint["kid"]) == (1, prev, key_id(VERIFY))
    message = canonical({"seq": 1, "prev": prev, "kid": key_id(VERIFY), "time": TIME})
    VERIFY.verify(base64.b64decode(checkpoint["signature"]), message)


# -- verify -------------------------------------------------------------------------------------------


def test_verify_passes_an_intact_file(tmp_path: Path) -> None:
    records = build(10, checkpoint_every=4)
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY], strict=True)
    assert report.ok, report.first_break
    assert (report.records, report.checkpoints, report.unsigned_tail, report.unsigned) == (
        len(records),
        3,
        0,
        0,
    )
    assert report.warnings == []
    assert (report.last_seq, report.last_hash) == (records[-1]["seq"], records[-1]["hash"])


def test_an_empty_file_does_not_verify(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"")
    report = verify(path)
    assert not report.ok
    assert report.first_break is not None
    assert (report.first_break.line, report.first_break.seq) == (1, None)
    assert report.first_break.reason.startswith("the record is empty")
    assert (report.records, report.last_seq) == (0, None)


def test_a_file_that_does_not_begin_with_a_start_record_does_not_verify(tmp_path: Path) -> None:
    chain = Chain()
    records = [chain.link(exchange(0)), chain.checkpoint(SIGNING, TIME)]
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.first_break is not None
    assert (report.first_break.line, report.first_break.seq, report.first_break.record_id) == (1, 0, "r0")
    assert report.first_break.reason.startswith("the first record is not a start record")


def test_a_missing_file_a_directory_or_a_device_is_a_record_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(
        RecordError, match=rf"^{re.escape(str(missing))}: cannot read the record: No such file"
    ):
        verify(missing)
    with pytest.raises(
        RecordError, match=rf"^{re.escape(str(tmp_path))}: cannot read the record: Is a directory"
    ):
        verify(tmp_path)
    with pytest.raises(RecordError, match=r"^/dev/zero: not a regular file"):
        verify(Path("/dev/zero"))


HOSTILE = {
    "nan": (b'{"hash":"00","prev":"00","seq":SEQ,"type":"exchange","v":NaN}', "NaN or an infinite number"),
    "huge-float": (b'{"hash":"00","prev":"00","seq":SEQ,"type":"exchange","v":1e999}', "NaN or an infinite"),
    "nested-infinity": (b'{"hash":"00","seq":SEQ,"type":"x","v":[{"w":-Infinity}]}', "NaN or an infinite"),
    "lone-surrogate": (b'{"hash":"00","prev":"00","seq":SEQ,"type":"\\ud800"}', "hash does not match"),
    "array": (b"[1,2]", "is not a JSON object"),
    "string": (b'"start"', "is not a JSON object"),
    "hash-not-a-string": (b'{"hash":5,"prev":"00","seq":SEQ,"type":"exchange"}', "is not a record"),
    "seq-a-float": (b'{"hash":"00","prev":"00","seq":1.0,"type":"exchange"}', "is not a record"),
    "deep": (b'{"hash":"00","seq":SEQ,"v":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "is not JSON"),
    "huge-int": (b'{"hash":"00","seq":' + b"9" * 5000 + b"}", "is not JSON"),
    "not-utf8": (b'{"hash":"\xff\xfe","seq":SEQ}', "is not JSON"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("last", [True, False], ids=["last-line", "mid-file"])
def test_a_hostile_line_is_a_break_not_an_exception(tmp_path: Path, name: str, last: bool) -> None:
    records = build(2, checkpoint_every=2)
    line, reason = HOSTILE[name]
    line = line.replace(b"SEQ", str(len(records)).encode())
    path = write(tmp_path / "r.jsonl", records)
    with path.open("ab") as file:
        file.write(line + b"\n")
        if not last:
            file.write(canonical(Chain(len(records) + 1, "0" * 64).link(exchange(9))) + b"\n")
    report = verify(path, [VERIFY])
    assert not report.ok
    assert report.first_break is not None
    assert report.first_break.line == len(records) + 1
    assert reason in report.first_break.reason


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: c.update(note="anything"), "'note'"),
        (lambda c: c.update(signed={**c["signed"], "by": "someone"}), "'signed.by'"),
    ],
    ids=["top", "signed"],
)
def test_a_checkpoint_with_an_unsigned_extra_field_is_a_break(
    tmp_path: Path, change: Any, field: str
) -> None:
    records = build(3, checkpoint_every=3)
    assert records[-1]["type"] == "checkpoint"
    change(records[-1])
    records = rechain(records)
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.first_break is not None
    assert report.first_break.line == len(records)
    assert report.first_break.reason.startswith(f"unexpected field {field} in a checkpoint")


def test_an_edited_field_is_found(tmp_path: Path) -> None:
    records = build(6, checkpoint_every=3)
    target = line_of(records, "r4")
    records[target - 1]["findings"]["request"][0]["rule"] = "nothing_to_see"
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert not report.ok
    assert report.first_break is not None
    assert report.first_break.line == target
    assert report.first_break.record_id == "r4"
    assert report.first_break.reason == "hash does not match the record's content (edited?)"


def test_an_edited_field_with_its_hash_recomputed_is_found(tmp_path: Path) -> None:
    records = build(6, checkpoint_every=3)
    target = line_of(records, "r4")
    records[target - 1]["findings"]["request"][0]["rule"] = "nothing_to_see"
    records[target - 1]["hash"] = record_hash(records[target - 1])
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.first_break is not None
    assert report.first_break.line == target + 1
    assert (
        report.first_break.reason
        == f"prev does not match line {target}'s hash (a record deleted, inserted or moved?)"
    )


def test_a_deleted_record_is_found(tmp_path: Path) -> None:
    records = build(6, checkpoint_every=3)
    target = line_of(records, "r4")
    del records[target - 1]
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.first_break is not None
    assert report.first_break.line == target
    assert report.first_break.record_id == "r5"
    assert "follows seq" in report.first_break.reason
    assert "deleted" in report.first_break.reason


def test_a_deleted_record_with_the_chain_rebuilt_is_found_by_the_next_checkpoint(tmp_path: Path) -> None:
    records = build(6, checkpoint_every=3)
    target = line_of(records, "r4")
    del records[target - 1]
    records = rechain(records)
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.first_break is not None
    next_checkpoint = next(n for n, r in enumerate(records, 1) if n >= target and r["type"] == "checkpoint")
    assert report.first_break.line == next_checkpoint
    assert "not its own" in report.first_break.reason


def test_swapped_records_are_found(tmp_path: Path) -> None:
    records = build(6, checkpoint_every=3)
    a, b = line_of(records, "r3"), line_of(records, "r4")
    records[a - 1], records[b - 1] = records[b - 1], records[a - 1]
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.first_break is not None
    assert report.first_break.line == a
    assert report.first_break.record_id == "r4"


def test_an_inserted_copy_is_found(tmp_path: Path) -> None:
    records = build(6, checkpoint_every=3)
    target = line_of(records, "r2")
    records.insert(target, dict(records[target - 1]))
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.first_break is not None
    assert report.first_break.line == target + 1
    assert "inserted" in report.first_break.reason


def test_an_inserted_record_with_a_rebuilt_chain_is_found_by_the_next_checkpoint(tmp_path: Path) -> None:
    records = build(6, checkpoint_every=3)
    target = line_of(records, "r4")
    records.insert(target, {**exchange(99), "id": "forged"})
    records = rechain(records)
    # The forger also rewrites the checkpoint's signed fields; only the signature stays wrong.
    for record in records:
        if record["type"] == "checkpoint":
            record["signed"] = {"seq": record["seq"], "prev": record["prev"]}
    records = rechain(records)
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.first_break is not None
    assert records[report.first_break.line - 1]["type"] == "checkpoint"
    assert report.first_break.line > line_of(records, "forged")
    assert report.first_break.reason == "checkpoint signature is invalid"


def test_a_forged_checkpoint_signature_is_found(tmp_path: Path) -> None:
    records = build(6, checkpoint_every=3)
    target = next(n for n, r in enumerate(records, 1) if r["type"] == "checkpoint")
    signature = bytearray(base64.b64decode(records[target - 1]["signature"]))
    signature[0] ^= 0x80
    records[target - 1]["signature"] = base64.b64encode(bytes(signature)).decode()
    records = rechain(records)
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.first_break is not None
    assert report.first_break.line == target
    assert report.first_break.reason == "checkpoint signature is invalid"


def test_a_checkpoint_signed_by_another_key_is_found(tmp_path: Path) -> None:
    records = build(6, checkpoint_every=3, key=OTHER_SIGNING)
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.first_break is not None
    assert report.first_break.line == next(n for n, r in enumerate(records, 1) if r["type"] == "checkpoint")
    assert "unknown key" in report.first_break.reason
    assert verify(tmp_path / "r.jsonl", [OTHER_SIGNING.public_key()], strict=True).ok


def test_a_checkpoint_resigned_by_another_key_under_the_right_kid_is_invalid(tmp_path: Path) -> None:
    chain = Chain()
    records = [chain.link({"type": "start"}), chain.link(exchange(1))]
    kid = key_id(VERIFY)
    message = canonical({"seq": chain.seq, "prev": chain.last_hash, "kid": kid, "time": TIME})
    records.append(
        chain.link(
            {
                "type": "checkpoint",
                "time": TIME,
                "kid": kid,
                "signed": {"seq": chain.seq, "prev": chain.last_hash},
                "signature": base64.b64encode(OTHER_SIGNING.sign(message)).decode(),
            }
        )
    )
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.first_break is not None
    assert (report.first_break.line, report.first_break.reason) == (3, "checkpoint signature is invalid")


def test_verify_with_several_keys_picks_by_kid(tmp_path: Path) -> None:
    records = build(3, checkpoint_every=2)
    assert verify(write(tmp_path / "r.jsonl", records), [OTHER_SIGNING.public_key(), VERIFY], strict=True).ok


def test_a_truncation_leaves_an_unsigned_tail(tmp_path: Path) -> None:
    records = build(8, checkpoint_every=3)
    last_checkpoint = max(
        n for n, r in enumerate(records, 1) if r["type"] == "checkpoint" and n < len(records)
    )
    cut = records[: last_checkpoint + 2]
    path = write(tmp_path / "r.jsonl", cut)
    lenient = verify(path, [VERIFY])
    assert lenient.ok
    assert lenient.unsigned_tail == 2
    assert any(f"2 record(s) from line {last_checkpoint + 1} on" in w for w in lenient.warnings)
    strict = verify(path, [VERIFY], strict=True)
    assert not strict.ok
    assert strict.first_break is not None
    assert strict.first_break.line == last_checkpoint + 1
    assert strict.first_break.seq == cut[last_checkpoint]["seq"]
    assert strict.first_break.record_id == cut[last_checkpoint]["id"]
    assert "not covered by a verified checkpoint" in strict.first_break.reason


def test_a_truncation_back_to_a_checkpoint_is_caught_only_by_an_anchor(tmp_path: Path) -> None:
    records = build(8, checkpoint_every=3)
    first_checkpoint = next(n for n, r in enumerate(records, 1) if r["type"] == "checkpoint")
    logged = {r["seq"]: r["hash"] for r in records if r["type"] == "checkpoint"}
    path = write(tmp_path / "r.jsonl", records[:first_checkpoint])
    report = verify(path, [VERIFY], strict=True)
    assert report.ok  # the file alone cannot show it
    assert report.last_hash == records[first_checkpoint - 1]["hash"]
    anchored = verify(path, [VERIFY], anchors=logged)
    assert not anchored.ok
    assert anchored.first_break is not None
    end = records[first_checkpoint - 1]["seq"]
    second = sorted(logged)[1]
    assert anchored.first_break.reason == (f"anchor seq {second}: the file ends at seq {end} (truncated?)")
    assert anchored.first_break.line == first_checkpoint + 1
    assert anchored.anchors_checked == 1


def test_a_tail_rewritten_after_the_last_checkpoint_is_caught_by_an_anchor(tmp_path: Path) -> None:
    records = build(6, checkpoint_every=3)
    anchor = records[-1]
    assert anchor["type"] == "checkpoint"
    # Without the signing key: drop the last checkpoint, edit an unsigned record, rechain, pad to length.
    forged = records[:-1]
    forged[line_of(forged, "r4") - 1]["findings"] = {}
    forged = rechain([*forged, exchange(99)])
    path = write(tmp_path / "r.jsonl", forged)
    assert verify(path, [VERIFY]).ok
    report = verify(path, [VERIFY], anchors={anchor["seq"]: anchor["hash"]})
    assert report.first_break is not None
    assert report.first_break.line == len(forged)
    assert (report.first_break.seq, report.first_break.record_id) == (anchor["seq"], "r99")
    assert report.first_break.reason == f"anchor seq {anchor['seq']}: hash differs (rewritten?)"
    assert report.anchors_checked == 0


def test_anchors_that_match_are_counted(tmp_path: Path) -> None:
    records = build(8, checkpoint_every=3)
    anchors = {r["seq"]: r["hash"] for r in records if r["type"] in ("start", "checkpoint")}
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY], strict=True, anchors=anchors)
    assert report.ok, report.first_break
    assert report.anchors_checked == len(anchors) == 4
    with pytest.raises(ValueError, match="anchor"):
        verify(tmp_path / "r.jsonl", anchors={-1: records[0]["hash"]})


def test_signed_through_names_the_last_verified_checkpoint(tmp_path: Path) -> None:
    records = build(8, checkpoint_every=3)
    checkpoints = [r["seq"] for r in records if r["type"] == "checkpoint"]
    path = write(tmp_path / "r.jsonl", records)
    assert verify(path, [VERIFY]).signed_through == checkpoints[-1]
    assert verify(path).signed_through is None
    cut = write(tmp_path / "cut.jsonl", records[: checkpoints[1] + 3])
    report = verify(cut, [VERIFY])
    assert (report.signed_through, report.unsigned_tail) == (checkpoints[1], 2)


def test_with_a_key_given_a_file_without_any_checkpoint_is_a_break(tmp_path: Path) -> None:
    records = build(3)
    path = write(tmp_path / "r.jsonl", records)
    report = verify(path, [VERIFY])
    assert report.first_break is not None
    assert (report.first_break.line, report.first_break.record_id) == (2, "r0")
    assert report.first_break.reason.startswith(
        "no checkpoint is signed by the given key(s): nothing in the file is authenticated"
    )
    assert "younger" in report.first_break.reason
    assert report.signed_through is None
    assert verify(path).ok  # without a key nothing is claimed; warnings say so


def test_with_a_key_given_a_file_of_start_and_gap_records_only_verifies(tmp_path: Path) -> None:
    chain = Chain()
    records = [
        chain.link({"type": "start", "time": TIME, "pid": 1}),
        chain.link({"type": "gap", "time": TIME, "lost": 0, "first_lost_id": None, "reason": "x"}),
        chain.link({"type": "start", "time": TIME, "pid": 2}),
    ]
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.ok, report.first_break
    assert (report.signed_through, report.unsigned_tail) == (None, 3)


def test_without_keys_signatures_are_unchecked(tmp_path: Path) -> None:
    records = build(5, checkpoint_every=2)
    path = write(tmp_path / "r.jsonl", records)
    report = verify(path)
    assert report.ok
    assert report.unchecked == report.checkpoints == 3
    assert report.unsigned_tail == len(records)
    assert report.unsigned == len(records) - 1  # all but the start record
    assert any("3 checkpoint signature(s) not checked" in w for w in report.warnings)
    strict = verify(path, strict=True)
    assert strict.first_break is not None
    assert strict.first_break.line == 1
    assert "no verify key was given" in strict.first_break.reason


# -- runs and final checkpoints -----------------------------------------------------------------------


def test_a_final_checkpoint_signs_its_final_flag() -> None:
    chain = Chain()
    chain.link({"type": "start"})
    prev = chain.last_hash
    checkpoint = chain.checkpoint(SIGNING, TIME, final=True)
    assert checkpoint["final"] is True
    kid = key_id(VERIFY)
    signature = base64.b64decode(checkpoint["signature"])
    VERIFY.verify(signature, canonical({"seq": 1, "prev": prev, "kid": kid, "time": TIME, "final": True}))
    assert checkpoint_message(1, prev, kid, TIME, True) != checkpoint_message(1, prev, kid, TIME)
    with pytest.raises(InvalidSignature):
        VERIFY.verify(signature, checkpoint_message(1, prev, kid, TIME))
    assert "final" not in chain.checkpoint(SIGNING, TIME)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda c: c.update(final=True), "checkpoint signature is invalid"),
        (lambda c: c.update(final=False), "checkpoint's final field is not true"),
    ],
    ids=["added", "false"],
)
def test_a_final_flag_the_signature_does_not_cover_is_a_break(
    tmp_path: Path, change: Any, reason: str
) -> None:
    records = build(3, checkpoint_every=3)
    change(records[-1])
    records = rechain(records)
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.first_break is not None
    assert report.first_break.line == len(records)
    assert report.first_break.reason.startswith(reason)


def test_a_final_flag_removed_is_a_break(tmp_path: Path) -> None:
    chain = Chain()
    records = [
        chain.link({"type": "start"}),
        chain.link(exchange(0)),
        chain.checkpoint(SIGNING, TIME, final=True),
    ]
    path = write(tmp_path / "r.jsonl", records)
    assert verify(path, [VERIFY], strict=True).ok
    del records[-1]["final"]
    report = verify(write(path, rechain(records)), [VERIFY])
    assert report.first_break is not None
    assert (report.first_break.line, report.first_break.reason) == (3, "checkpoint signature is invalid")


def runs(*bodies: list[dict[str, Any] | str]) -> list[dict[str, Any]]:
    """Runs chained one after the other; in a run's bodies, "checkpoint" and "final" stand for checkpoints."""
    chain = Chain()
    records = []
    for number, run in enumerate(bodies, 1):
        records.append(chain.link({"type": "start", "time": TIME, "pid": number}))
        for body in run:
            if isinstance(body, str):
                records.append(chain.checkpoint(SIGNING, TIME, final=body == "final"))
            else:
                records.append(chain.link(body))
    return records


GAP = {"type": "gap", "time": TIME, "lost": 1, "first_lost_id": None, "reason": "x"}


def test_records_after_a_runs_last_checkpoint_stay_unsigned_after_a_later_checkpoint(tmp_path: Path) -> None:
    records = runs([exchange(0), "checkpoint", exchange(1), GAP, exchange(2)], [exchange(3), "final"])
    path = write(tmp_path / "r.jsonl", records)
    report = verify(
        path, [VERIFY], anchors={r["seq"]: r["hash"] for r in records if r["type"] == "checkpoint"}
    )
    assert report.ok, report.first_break
    assert (report.unsigned, report.unsigned_tail) == (2, 0)  # r1 and r2; not the gap record
    assert report.signed_through == records[-1]["seq"]
    assert report.warnings == [
        "line 5: gap record: 1 record(s) lost (x)",
        "lines 4-6: records after the last checkpoint of a run, before the start at line 7: "
        "protected by the chain only",
    ]
    strict = verify(path, [VERIFY], strict=True)
    assert strict.first_break is not None
    assert (strict.first_break.line, strict.first_break.seq, strict.first_break.record_id) == (4, 3, "r1")
    assert strict.first_break.reason.startswith("lines 4-6: records after the last checkpoint of a run")


def test_records_of_a_run_without_a_checkpoint_stay_unsigned(tmp_path: Path) -> None:
    records = runs([exchange(0)], [exchange(1), "final"])
    path = write(tmp_path / "r.jsonl", records)
    report = verify(path, [VERIFY])
    assert report.ok, report.first_break
    assert (report.unsigned, report.unsigned_tail) == (1, 0)
    assert report.warnings == [
        "line 2: records of a run without a checkpoint, before the start at line 3: "
        "protected by the chain only"
    ]
    strict = verify(path, [VERIFY], strict=True)
    assert strict.first_break is not None
    assert (strict.first_break.line, strict.first_break.record_id) == (2, "r0")


def test_unsigned_counts_every_run_and_the_tail(tmp_path: Path) -> None:
    records = runs(
        [exchange(0), "checkpoint", exchange(1)], [exchange(2), "checkpoint", exchange(3), exchange(4)]
    )
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.ok, report.first_break
    assert (report.unsigned, report.unsigned_tail) == (3, 2)


def test_a_record_after_a_final_checkpoint_is_a_break(tmp_path: Path) -> None:
    records = runs([exchange(0), "final", exchange(1)], [exchange(2), "final"])
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.first_break is not None
    assert (report.first_break.line, report.first_break.record_id) == (4, "r1")
    assert report.first_break.reason == (
        "a record after the final checkpoint of a run, before any start: appended while no writer ran?"
    )
    # A start after a final checkpoint is how the next writer begins.
    clean = runs([exchange(0), "final"], [exchange(2), "final"])
    assert verify(write(tmp_path / "r.jsonl", clean), [VERIFY], strict=True).ok


def test_a_line_that_is_not_json_is_a_break(tmp_path: Path) -> None:
    records = build(4, checkpoint_every=2)
    path = write(tmp_path / "r.jsonl", records)
    lines = path.read_bytes().splitlines(keepends=True)
    lines.insert(3, b"hello\n")
    path.write_bytes(b"".join(lines))
    report = verify(path, [VERIFY])
    assert report.first_break is not None
    assert report.first_break.line == 4
    assert report.first_break.reason.startswith("line 4 is not JSON")


def test_a_reformatted_line_is_a_break(tmp_path: Path) -> None:
    records = build(3, checkpoint_every=2)
    path = write(tmp_path / "r.jsonl", records)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = json.dumps(records[2], sort_keys=True).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    report = verify(path, [VERIFY])
    assert report.first_break is not None
    assert report.first_break.line == 3
    assert "canonical" in report.first_break.reason


def test_a_file_missing_its_beginning_is_a_break(tmp_path: Path) -> None:
    records = build(3, checkpoint_every=2)
    report = verify(write(tmp_path / "r.jsonl", records[2:]), [VERIFY])
    assert report.first_break is not None
    assert report.first_break.line == 1
    assert "beginning of the file" in report.first_break.reason


def test_verify_stops_at_the_first_break(tmp_path: Path) -> None:
    records = build(6, checkpoint_every=3)
    records[2]["id"] = "edited"
    records[5]["id"] = "edited too"
    report = verify(write(tmp_path / "r.jsonl", records), [VERIFY])
    assert report.first_break is not None
    assert report.first_break.line == 3
    assert report.records == 3


# -- torn writes --------------------------------------------------------------------------------------


def torn_file(tmp_path: Path) -> tuple[Path, list[dict[str, Any]], bytes]:
    records = build(4, checkpoint_every=2)
    path = write(tmp_path / "r.jsonl", records)
    partial = (canonical(Chain(99).link(exchange(9))) + b"\n")[:40]
    with path.open("ab") as file:
        file.write(partial)
    return path, records, partial


def test_read_tail_finds_a_torn_last_line(tmp_path: Path) -> None:
    path, records, partial = torn_file(tmp_path)
    tail = read_tail(path)
    assert (tail.seq, tail.last_hash) == (records[-1]["seq"] + 1, records[-1]["hash"])
    assert tail.needs_newline
    assert tail.torn is not None
    assert tail.torn.as_json() == {
        "line": len(records) + 1,
        "lines": 1,
        "bytes": 40,
        "sha256": hashlib.sha256(partial).hexdigest(),
    }


def test_an_unacknowledged_torn_line_is_a_break(tmp_path: Path) -> None:
    path, records, _ = torn_file(tmp_path)
    report = verify(path, [VERIFY])
    assert report.first_break is not None
    assert report.first_break.line == len(records) + 1
    assert "unacknowledged" in report.first_break.reason


def acknowledge(path: Path, kind: str = "start", **overrides: Any) -> dict[str, Any]:
    tail = read_tail(path)
    assert tail.torn is not None
    chain = Chain.following(tail)
    torn = {**tail.torn.as_json(), **overrides}
    record = chain.link({"type": kind, "time": TIME, "torn": torn})
    with path.open("ab") as file:
        file.write((b"\n" if tail.needs_newline else b"") + canonical(record) + b"\n")
    return record


@pytest.mark.parametrize("kind", ["start", "gap"])
def test_an_acknowledged_torn_line_is_a_warning(tmp_path: Path, kind: str) -> None:
    path, records, _ = torn_file(tmp_path)
    acknowledge(path, kind)
    report = verify(path, [VERIFY])
    assert report.ok, report.first_break
    torn_line = len(records) + 1
    assert any(w.startswith(f"line {torn_line}: a torn write (40 bytes)") for w in report.warnings)
    assert read_tail(path).torn is None


@pytest.mark.parametrize(
    "overrides",
    [{"sha256": "0" * 64}, {"bytes": 41}, {"line": 3}, {"lines": 2}],
    ids=["sha", "bytes", "line", "lines"],
)
def test_a_torn_line_acknowledged_wrongly_is_a_break(tmp_path: Path, overrides: dict[str, Any]) -> None:
    path, records, _ = torn_file(tmp_path)
    acknowledge(path, **overrides)
    report = verify(path, [VERIFY])
    assert report.first_break is not None
    assert report.first_break.line == len(records) + 1


def test_an_acknowledgement_must_be_a_start_or_gap_record(tmp_path: Path) -> None:
    path, records, _ = torn_file(tmp_path)
    acknowledge(path, "exchange")
    report = verify(path, [VERIFY])
    assert report.first_break is not None
    assert report.first_break.line == len(records) + 1


def test_a_run_of_torn_lines_is_acknowledged_as_one(tmp_path: Path) -> None:
    path, records, partial = torn_file(tmp_path)
    with path.open("ab") as file:
        file.write(b"\n" + partial[:10])
    tail = read_tail(path)
    assert tail.torn is not None
    assert (tail.torn.line, tail.torn.lines, tail.torn.size) == (len(records) + 1, 2, 51)
    assert tail.torn.sha256 == hashlib.sha256(partial + b"\n" + partial[:10]).hexdigest()
    acknowledge(path, "gap")
    report = verify(path, [VERIFY])
    assert report.ok, report.first_break
    assert any(
        w.startswith(f"lines {len(records) + 1}-{len(records) + 2}: a torn write") for w in report.warnings
    )


def test_a_torn_first_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"type":"sta')
    tail = read_tail(path)
    assert (tail.seq, tail.last_hash) == (0, ZERO_HASH)
    assert tail.torn is not None
    assert (tail.torn.line, tail.torn.size) == (1, 12)
    acknowledge(path)
    assert verify(path).ok


def test_a_complete_last_record_without_newline_is_not_torn(tmp_path: Path) -> None:
    records = build(2)
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\n".join(canonical(r) for r in records))
    tail = read_tail(path)
    assert tail.torn is None
    assert tail.needs_newline
    assert (tail.seq, tail.last_hash) == (3, records[-1]["hash"])
    report = verify(path)
    assert report.ok
    assert any("no final newline" in w for w in report.warnings)


# -- read_tail ----------------------------------------------------------------------------------------


def test_read_tail_of_a_missing_or_empty_file(tmp_path: Path) -> None:
    assert read_tail(tmp_path / "missing.jsonl") == read_tail(write(tmp_path / "empty.jsonl", []))
    tail = read_tail(tmp_path / "missing.jsonl")
    assert (tail.seq, tail.last_hash, tail.torn, tail.needs_newline, tail.regular) == (
        0,
        ZERO_HASH,
        None,
        False,
        True,
    )


def test_read_tail_of_something_that_is_not_a_file(tmp_path: Path) -> None:
    assert not read_tail(Path("/dev/full")).regular
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    tail = read_tail(fifo)  # must not wait for a writer to open the pipe
    assert (tail.regular, tail.seq) == (False, 0)


def test_read_tail_of_a_large_file_reads_only_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = Chain()
    path = tmp_path / "big.jsonl"
    with path.open("wb") as file:
        while file.tell() < 5 * 1024 * 1024:
            file.write(canonical(chain.link({**exchange(chain.seq), "pad": "x" * 500})) + b"\n")
    real_pread = os.pread
    read = 0

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        nonlocal read
        data = real_pread(fd, length, offset)
        read += len(data)
        return data

    monkeypatch.setattr(os, "pread", counting_pread)
    tail = read_tail(path)
    assert (tail.seq, tail.last_hash, tail.torn) == (chain.seq, chain.last_hash, None)
    assert 0 < read <= 64 * 1024


def test_read_tail_reaches_back_over_a_last_record_larger_than_a_block(tmp_path: Path) -> None:
    chain = Chain()
    records = [chain.link(exchange(0)), chain.link({**exchange(1), "pad": "y" * 300_000})]
    path = write(tmp_path / "r.jsonl", records)
    with path.open("ab") as file:
        file.write(b"z" * 100_000)
    tail = read_tail(path)
    assert (tail.seq, tail.last_hash) == (2, records[-1]["hash"])
    assert tail.torn is not None
    assert (tail.torn.line, tail.torn.size) == (3, 100_000)


# -- reading ------------------------------------------------------------------------------------------


def test_iter_records_and_find(tmp_path: Path) -> None:
    records = build(3)
    path = write(tmp_path / "r.jsonl", records)
    assert list(iter_records(path)) == list(enumerate(records, 1))
    assert find(path, "r1") == records[2]
    assert find(path, "nope") is None


def test_iter_records_raises_on_a_bad_line_and_find_skips_it(tmp_path: Path) -> None:
    path, records, _ = torn_file(tmp_path)
    acknowledge(path)
    with path.open("ab") as file:
        file.write(canonical(Chain(50).link(exchange(77))) + b"\n")
    with pytest.raises(RecordError, match=f"{path}: line {len(records) + 1} is not JSON"):
        list(iter_records(path))
    found = find(path, "r77")
    assert found is not None
    assert found["seq"] == 50
