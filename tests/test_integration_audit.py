"""Audit through real Envoy: one trace from Envoy's ingress to extproc's decision in a real OTLP receiver,
and the session record the server writes, verified, tampered with, shown and replayed."""

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extproc.audit import spans
from extproc.audit.keys import generate_keys
from extproc.audit.record import iter_records
from extproc.devenv import Stack
from extproc.identity.dev import mint_dev_token

from .conftest import start_stack
from .otlp import Receiver, Span

CARD = "4111 1111 1111 1111"
AWS_KEY = "AKIAIOSFODNN7EXAMPLF"  # the documented example key itself is allow-listed
ROOT = Path(__file__).resolve().parent.parent
CODENAME_RULE = """\
rules:
- id: codename-falcon
  entity: PROJECT_CODENAME
  category: confidential
  severity: high
  pattern: '\\bProject Falcon\\b'
  mask: { strategy: redact }
  samples:
    match: ["the Project Falcon launch"]
    no_match: ["a falcon project"]
"""


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    running = Receiver().start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_keys(tmp_path_factory.mktemp("audit-keys"))


@pytest.fixture(scope="module")
def record_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit") / "session.jsonl"


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dev-identity")


@pytest.fixture(scope="module")
def audited(
    tmp_path_factory: pytest.TempPathFactory,
    receiver: Receiver,
    keys: dict[str, Path],
    record_path: Path,
    dev_dir: Path,
) -> Iterator[Stack]:
    env = {
        "EXTPROC_AUDIT__RECORD_PATH": str(record_path),
        "EXTPROC_AUDIT__SEALING_KEY_FILE": str(keys["auditor_pub"]),
        "EXTPROC_AUDIT__SIGNING_KEY_FILE": str(keys["signing_key"]),
        "EXTPROC_AUDIT__CHECKPOINT_EVERY": "3",
        "EXTPROC_TELEMETRY__EXPORT_DELAY_SECONDS": "0.2",
        "EXTPROC_TELEMETRY__METRICS_INTERVAL_SECONDS": "1",
    }
    running = start_stack(
        tmp_path_factory.mktemp("audited") / "stack.log",
        dev_identity=dev_dir,
        otlp_endpoint=receiver.endpoint,
        extra_env=env,
    )
    yield running
    running.stop()


def call(
    stack: Stack,
    dev_dir: Path,
    content: str,
    groups: list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    token = mint_dev_token(dev_dir, "alice", groups or [], 600)
    body = {"model": "demo-small", "messages": [{"role": "user", "content": content}]}
    return httpx.post(
        f"{stack.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {token}", **(headers or {})},
        timeout=30,
    )


def exchange_span(receiver: Receiver, decision_id: str) -> Span:
    def found(r: Receiver) -> Span | None:
        for span in r.spans:
            if span.name == spans.EXCHANGE_SPAN and span.attributes.get(spans.DECISION_ID) == decision_id:
                return span
        return None

    span: Span = receiver.wait_for(found)
    return span


def by_id(receiver: Receiver, trace_id: str, span_id: str) -> Span:
    def found(r: Receiver) -> Span | None:
        return next((s for s in r.spans if s.trace_id == trace_id and s.span_id == span_id), None)

    span: Span = receiver.wait_for(found)
    return span


def test_one_trace_runs_from_envoys_ingress_to_the_decision(
    audited: Stack, receiver: Receiver, dev_dir: Path
) -> None:
    answer = call(audited, dev_dir, f"my card is {CARD}")
    assert answer.status_code == 200, answer.text
    decision_id = answer.headers["x-dlp-decision-id"]
    exchange = exchange_span(receiver, decision_id)
    assert exchange.service == "extproc"
    assert exchange.attributes[spans.DECISION] == "masked"
    assert exchange.attributes[spans.FINDINGS_ENTITY + "CREDIT_CARD"] >= 1
    # Its parent is Envoy's client span of the ext_proc stream, whose parent is Envoy's ingress span.
    client = by_id(receiver, exchange.trace_id, exchange.parent_span_id)
    assert client.service == "envoy"
    assert "ExternalProcessor.Process" in client.name
    ingress = by_id(receiver, exchange.trace_id, client.parent_span_id)
    assert ingress.service == "envoy"
    assert ingress.name == "ingress"
    assert ingress.attributes.get("guid:x-request-id") == exchange.attributes[spans.REQUEST_ID]
    # The exchange's own children: token verification and the scans, in the same trace.
    children = receiver.wait_for(
        lambda r: (
            {s.name for s in r.spans if s.parent_span_id == exchange.span_id}
            >= {
                spans.VERIFY_SPAN,
                spans.SCAN_SPAN,
            }
        )
    )
    assert children
    # Nothing any span carries is the card number or the caller's name in clear.
    for span in receiver.spans:
        if span.trace_id == exchange.trace_id:
            text = json.dumps(span.attributes)
            assert "4111" not in text
            assert "alice" not in text
    assert len(str(exchange.attributes[spans.SUBJECT_HASH])) == 16


def test_a_blocked_request_shows_its_policy_and_code_in_the_trace(
    audited: Stack, receiver: Receiver, dev_dir: Path
) -> None:
    answer = call(audited, dev_dir, f"deploy with {AWS_KEY}", groups=["engineering"])
    assert answer.status_code == 403, answer.text
    span = exchange_span(receiver, answer.headers["x-dlp-decision-id"])
    assert span.attributes[spans.DECISION] == "refused"
    assert span.attributes[spans.ERROR_CODE] == answer.json()["error"]
    assert span.attributes[spans.POLICY] == "no-credentials-in-prompts"
    assert AWS_KEY not in json.dumps(span.attributes)


# What a caller may send that Envoy's defaults read as a sampling decision. The UUID extension reads one
# from the 14th hex digit of a UUID ('9' sampled, 'a' forced, 'b' client-forced, '4' none yet), rewrites
# the UUID to say it, and takes an id it cannot read as "not traceable": with `job-42`, nothing at all was
# traced. A traceparent's sampled flag ('00' at the end) was followed the same way.
CALLER_HEADERS = {
    "request-id-not-a-uuid": {"x-request-id": "job-42"},
    "request-id-uuid-without-decision": {"x-request-id": "0b4e2f3c-5d6e-4f70-8a9b-0c1d2e3f4a5b"},
    "request-id-uuid-digit-not-a-decision": {"x-request-id": "0b4e2f3c-5d6e-0f70-8a9b-0c1d2e3f4a5b"},
    "traceparent-not-sampled": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"},
}


@pytest.mark.parametrize("headers", CALLER_HEADERS.values(), ids=CALLER_HEADERS.keys())
@pytest.mark.parametrize(
    ("content", "groups", "status", "decision"),
    [(f"my card is {CARD}", [], 200, "masked"), (f"deploy with {AWS_KEY}", ["engineering"], 403, "refused")],
    ids=["masked", "refused"],
)
def test_what_the_caller_sends_does_not_decide_whether_the_exchange_is_traced(
    audited: Stack,
    receiver: Receiver,
    record_path: Path,
    dev_dir: Path,
    headers: dict[str, str],
    content: str,
    groups: list[str],
    status: int,
    decision: str,
) -> None:
    answer = call(audited, dev_dir, content, groups=groups, headers=headers)
    assert answer.status_code == status, answer.text
    decision_id = answer.headers["x-dlp-decision-id"]
    # The whole trace: Envoy's ingress, its client span of the ext_proc stream, extproc's decision.
    exchange = exchange_span(receiver, decision_id)
    assert exchange.attributes[spans.DECISION] == decision
    client = by_id(receiver, exchange.trace_id, exchange.parent_span_id)
    assert client.service == "envoy"
    assert "ExternalProcessor.Process" in client.name
    ingress = by_id(receiver, exchange.trace_id, client.parent_span_id)
    assert ingress.name == "ingress"
    if "traceparent" in headers:  # the caller's trace is continued, not restarted
        assert exchange.trace_id == headers["traceparent"].split("-")[1]
    # The caller's id is kept as sent, and recorded where Envoy's own would be.
    request_id = headers.get("x-request-id") or ingress.attributes["guid:x-request-id"]
    assert ingress.attributes.get("guid:x-request-id") == request_id
    assert exchange.attributes[spans.REQUEST_ID] == request_id
    assert records(record_path, decision_id)["request_id"] == request_id


def test_metrics_reach_the_collector(audited: Stack, receiver: Receiver, dev_dir: Path) -> None:
    call(audited, dev_dir, f"card {CARD}")

    def counted(r: Receiver) -> bool:
        return any(
            service == "extproc"
            and name == spans.FINDINGS_METRIC
            and any(labels.get("entity") == "CREDIT_CARD" for labels, _ in points)
            for service, name, points in r.metrics
        )

    assert receiver.wait_for(counted)
    names = {name for service, name, _ in receiver.metrics if service == "extproc"}
    assert {spans.EXCHANGES_METRIC, spans.DURATION_METRIC} <= names


def records(path: Path, decision_id: str, timeout: float = 15.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # The sidecar is still appending: a last line read half-written is read again on the next pass.
        for _, record in iter_records(path, skip_invalid=True):
            if record.get("id") == decision_id:
                return record
        time.sleep(0.1)
    raise AssertionError(f"no record {decision_id} in {path}")


def extproc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_session_record_holds_the_masked_exchange_and_seals_the_original(
    audited: Stack, receiver: Receiver, record_path: Path, dev_dir: Path
) -> None:
    answer = call(audited, dev_dir, f"my card is {CARD}, Project Falcon ships soon")
    decision_id = answer.headers["x-dlp-decision-id"]
    record = records(record_path, decision_id)
    assert record["decision"] == "masked"
    assert record["principal"] == {"subject": "alice", "issuer": "https://dev.extproc.invalid", "groups": []}
    assert record["trace_id"] == exchange_span(receiver, decision_id).trace_id
    request = record["request"]
    assert isinstance(request, dict)
    assert CARD not in request["masked"]
    assert "**** **** **** 1111" in request["masked"]
    assert {f["entity"] for f in record["findings"]["request"]} >= {"CREDIT_CARD"}  # type: ignore[index]
    # The original is in the file only sealed: nothing of the card in clear, anywhere in the record. (Not
    # "4111" alone: the record's hex digests hold those four characters now and then.)
    dumped = json.dumps(record)
    assert "4111 1111" not in dumped
    assert "41111111" not in dumped
    shown = extproc("audit", "show", decision_id, "--file", str(record_path))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == decision_id
    assert "sealed to auditor key" in shown.stdout


def test_verify_passes_on_the_record_and_finds_an_edit_a_deletion_and_a_reordering(
    audited: Stack, record_path: Path, keys: dict[str, Path], dev_dir: Path, tmp_path: Path
) -> None:
    ids = [call(audited, dev_dir, f"card {CARD} #{n}").headers["x-dlp-decision-id"] for n in range(4)]
    records(record_path, ids[-1])
    copy = tmp_path / "copy.jsonl"
    shutil.copy(record_path, copy)
    good = extproc("audit", "verify", str(copy), "--public-key", str(keys["signing_pub"]))
    assert good.returncode == 0, good.stderr
    assert "chain intact" in good.stdout
    lines = copy.read_text().splitlines()
    numbers = {json.loads(line).get("id"): n for n, line in enumerate(lines)}
    target = numbers[ids[1]]

    def broken(changed: list[str]) -> str:
        tampered = tmp_path / "tampered.jsonl"
        tampered.write_text("\n".join(changed) + "\n")
        result = extproc("audit", "verify", str(tampered), "--public-key", str(keys["signing_pub"]))
        assert result.returncode == 1, result.stdout
        return result.stderr

    edited = json.loads(lines[target])
    edited["decision"] = "allowed"
    changed = [*lines[:target], json.dumps(edited, separators=(",", ":")), *lines[target + 1 :]]
    assert f"line {target + 1} " in broken(changed)
    deleted = lines[:target] + lines[target + 1 :]
    assert f"line {target + 1} " in broken(deleted)
    swapped = [*lines[:target], lines[target + 1], lines[target], *lines[target + 2 :]]
    assert f"line {target + 1} " in broken(swapped)


def test_replay_reports_the_decisions_a_new_rule_changes(
    audited: Stack, record_path: Path, keys: dict[str, Path], dev_dir: Path, tmp_path: Path
) -> None:
    answer = call(audited, dev_dir, "status of Project Falcon, nothing else")
    decision_id = answer.headers["x-dlp-decision-id"]
    records(record_path, decision_id)
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules, ignore=shutil.ignore_patterns("policies"))
    (rules / "codename.yaml").write_text(CODENAME_RULE)
    key = str(keys["auditor_key"])
    result = extproc("audit", "replay", str(record_path), "--key", key, "--rules", str(rules), "--json")
    assert result.returncode == 0, result.stderr
    replayed = {entry["record_id"]: entry for entry in map(json.loads, result.stdout.splitlines())}
    entry = replayed[decision_id]
    assert entry["changed"] is True
    assert entry["before"]["decision"] == "allowed"
    assert entry["after"]["decision"] == "masked"
    assert "request: +codename-falcon:mask" in entry["changes"]
    # Unchanged rules decide the other exchanges as they were decided.
    same = extproc(
        "audit", "replay", str(record_path), "--key", str(keys["auditor_key"]), "--rules",
        str(ROOT / "rules"), "--fail-on-change",
    )  # fmt: skip
    assert same.returncode == 0, same.stdout + same.stderr
    assert " 0 decided differently" in same.stderr
