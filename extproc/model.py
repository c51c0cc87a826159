"""Frozen value types shared by the pure modules and the exchange. No I/O, no protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from extproc.approvals.model import ApprovalRequest, Person


class BodyMode(Enum):
    """How Envoy sends a body to the processor (mirrors ext_proc's ProcessingMode.BodySendMode)."""

    NONE = "NONE"
    STREAMED = "STREAMED"
    BUFFERED = "BUFFERED"
    BUFFERED_PARTIAL = "BUFFERED_PARTIAL"
    FULL_DUPLEX_STREAMED = "FULL_DUPLEX_STREAMED"
    GRPC = "GRPC"


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    request_body_mode: BodyMode = BodyMode.NONE
    response_body_mode: BodyMode = BodyMode.NONE


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected value: which rule, what kind of data, where in the decoded text (character offsets).

    Several rules may find one value (a card by ``credit-card`` and ``credit-card-keyword``); the detector
    reports it once, as the most specific of them (``extproc.detect.engine.merge``), over the span they
    cover together, and names the others, by rule id, in ``also_matched``. A policy weighs every one of
    them (``extproc.policy``)."""

    rule_id: str
    entity: str
    start: int
    end: int
    also_matched: tuple[str, ...] = ()

    @property
    def rule_ids(self) -> tuple[str, ...]:
        """The rule that reports the value, then every other rule that found it."""
        return (self.rule_id, *self.also_matched)

    def at(self, start: int, end: int) -> Finding:
        """The same finding at another span (offsets mapped to another text)."""
        return Finding(self.rule_id, self.entity, start, end, self.also_matched)


# Messages from Envoy, decoded by envoy.py.


class Direction(Enum):
    REQUEST = "request"
    RESPONSE = "response"


@dataclass(frozen=True, slots=True)
class Headers:
    """Request or response headers. Names are lower case; a repeated header keeps every value."""

    direction: Direction
    items: tuple[tuple[str, str], ...]
    end_of_stream: bool
    metadata: dict[str, object] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        for key, value in self.items:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Body:
    direction: Direction
    data: bytes
    end_of_stream: bool


@dataclass(frozen=True, slots=True)
class Trailers:
    direction: Direction


Event = Headers | Body | Trailers


# Answers to Envoy, encoded by envoy.py.


@dataclass(frozen=True, slots=True)
class HeaderChanges:
    """``set`` replaces every value of a header; ``append`` then adds one more value (a repeated header
    rewritten whole: its first value in ``set``, the others in ``append``)."""

    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()
    append: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ContinueHeaders:
    direction: Direction
    changes: HeaderChanges = HeaderChanges()
    metadata: dict[str, object] | None = None


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """Answer to a BUFFERED body message: the whole body, replaced when ``data`` is not None."""

    direction: Direction
    data: bytes | None
    changes: HeaderChanges = HeaderChanges()


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One FULL_DUPLEX_STREAMED body piece sent back to Envoy."""

    direction: Direction
    data: bytes
    end_of_stream: bool


@dataclass(frozen=True, slots=True)
class ContinueTrailers:
    direction: Direction


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer the client directly; the upstream (or the rest of the response) is not used."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    details: str = ""


@dataclass(frozen=True, slots=True)
class ExtendTimeout:
    """Tell Envoy to wait up to ``seconds`` for the answer to the message it sent last (ext_proc's
    ``override_message_timeout``, bounded by the filter's ``max_message_timeout``): a request held for
    approval."""

    seconds: float


@dataclass(frozen=True, slots=True)
class AwaitApproval:
    """Not for Envoy: the exchange needs an approval decided before it can answer. With ``request`` it
    asks for a new one (``hold`` set: wait up to ``hold_seconds`` for it); with ``redeem`` the caller
    presented an approval id (header ``x-approval-id``) to use for this body. The server does the
    asynchronous part and hands the result to ``Exchange.resume``."""

    request: ApprovalRequest | None = None
    redeem: str | None = None
    caller: Person | None = None
    body_digest: str = ""
    hold: bool = False
    hold_seconds: float = 0.0


Reply = (
    ContinueHeaders | ReplaceBody | StreamChunk | ContinueTrailers | Reject | ExtendTimeout | AwaitApproval
)


Actions = dict[str, tuple[tuple[str, str, str], ...]]  # direction -> (rule id, entity, action) per finding


@dataclass(frozen=True, slots=True)
class Shadowed:
    """What a policy in shadow mode would have done: asked beside the acting policy, never acted on."""

    refused: tuple[str, ...] = ()  # the error codes it would have refused the request with
    actions: Actions = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one exchange came to: the decision span's attributes, the metrics' labels and the session
    record's decision. Ids, codes, rule ids, entities and offsets only; never a matched value."""

    decision_id: str
    decision: str  # allowed | masked | refused | cut | passthrough | incomplete | error
    request_id: str = ""
    error_code: str | None = None
    policy: str | None = None
    enforce: bool = True
    actions: Actions = field(default_factory=dict)  # each decision the acting policy made, per direction
    findings: dict[str, tuple[Finding, ...]] = field(default_factory=dict)
    entities: dict[str, int] = field(default_factory=dict)  # entity -> findings, both directions
    rules: tuple[str, ...] = ()  # rule ids that found something, in order
    would_refuse: tuple[str, ...] = ()
    shadow: dict[str, Shadowed] = field(default_factory=dict)  # by shadow policy id
    subject: str | None = None
    subject_hash: str | None = None
    issuer: str | None = None
    groups: tuple[str, ...] = ()
    unmasked: bool = False  # unmasked answers were asked for and allowed
    unmasked_requested: bool = False
    route: str = ""
    method: str = ""
    model: str | None = None
    approval_id: str | None = None  # the approval this request asked for, or used
    approval_status: str | None = None  # pending (a ticket), approved, used, denied, expired
    snapshot: str = ""  # the version of the rules, policies and settings that decided (runtime.fingerprint)


@dataclass(frozen=True, slots=True)
class RecordedBody:
    """One direction's body for the session record: decoded, as it came and as it was sent on, each up
    to the record's cap (the sizes count everything)."""

    content_type: str
    original: bytes | None  # None: not kept (no auditor key to seal it to)
    original_bytes: int
    masked: bytes | None  # None: withheld, because a value went out unmasked (it is in the sealed original)
    masked_bytes: int
    status: str = ""  # the response's :status


@dataclass(frozen=True, slots=True)
class Recorded:
    """What the session record keeps of one exchange besides its Outcome."""

    started: float  # wall-clock seconds
    duration: float  # seconds
    request: RecordedBody | None
    response: RecordedBody | None
