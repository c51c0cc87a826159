"""One Exchange per ext_proc stream (one HTTP request and its response): the phase state machine.

The exchange sees only the plain events of ``extproc.model`` and answers with plain replies; ``envoy.py``
does the protobuf. It never answers an unexpected message with a silent allow: out-of-order, repeated or
unknown messages raise ProtocolError and the server aborts the stream, which Envoy (fail closed) turns
into an error for the client.

Body modes supported per direction: NONE, BUFFERED and FULL_DUPLEX_STREAMED. STREAMED, BUFFERED_PARTIAL
and GRPC are refused when the stream opens: the first cannot hold bytes back across trailers, the second
lets the part over its limit through unscanned, the third is not HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any
from urllib.parse import unquote

from extproc.approvals.model import Approval, ApprovalError, ApprovalRequest, Person
from extproc.audit.spans import ExchangeTrace, Instruments
from extproc.errors import AuthError, ClientError, ExtProcError, ProtocolError, UpstreamError
from extproc.identity import Principal, bearer_token, principal_from_metadata
from extproc.mask import Inspector
from extproc.mask.bodies import BodyProcessor, Passthrough
from extproc.mask.encoding import DecodeError, Decoder
from extproc.mask.headers import HeaderNotMaskable, HeaderScan, HeadersTooLarge, scan_headers, scan_short
from extproc.mask.registry import BodyLimits, Reading, Refused, Scope, choose, media_type
from extproc.media import media_in
from extproc.model import (
    Actions,
    AwaitApproval,
    Body,
    BodyMode,
    ContinueHeaders,
    ContinueTrailers,
    Direction,
    Event,
    Finding,
    HeaderChanges,
    Headers,
    Outcome,
    ProtocolConfig,
    Recorded,
    RecordedBody,
    Reject,
    ReplaceBody,
    Reply,
    Shadowed,
    StreamChunk,
    Trailers,
)
from extproc.policy import (
    Facts,
    FindingActions,
    LoadedPolicy,
    PolicyDenied,
    estimate_tokens,
    glob_match,
    prompt_texts,
)
from extproc.routes import (
    OUTPUT_TOKEN_FIELDS,
    get_field,
    is_model_path,
    output_token_field,
    set_field,
    within,
)
from extproc.runtime import Snapshot
from extproc.settings import LimitSettings

DECISION_HEADER = "x-dlp-decision-id"
UNMASKED_HEADER = "x-dlp-unmasked"
APPROVAL_HEADER = "x-approval-id"  # a caller's retry under an approval granted to a ticket
APPROVAL_PROMPT_BYTES = 16384  # of the masked request body, shown to approvers
METADATA_NAMESPACE = "llm.extproc"
SUPPORTED_BODY_MODES = frozenset({BodyMode.NONE, BodyMode.BUFFERED, BodyMode.FULL_DUPLEX_STREAMED})
_UNTRACED = Instruments()
_NO_CHANGES = HeaderChanges()


class Phase(IntEnum):
    START = 0
    REQUEST_HEADERS = 1
    REQUEST_BODY = 2
    REQUEST_TRAILERS = 3
    RESPONSE_HEADERS = 4
    RESPONSE_BODY = 5
    RESPONSE_TRAILERS = 6


def _phase_of(event: Event) -> Phase:
    request = event.direction is Direction.REQUEST
    if isinstance(event, Headers):
        return Phase.REQUEST_HEADERS if request else Phase.RESPONSE_HEADERS
    if isinstance(event, Body):
        return Phase.REQUEST_BODY if request else Phase.RESPONSE_BODY
    return Phase.REQUEST_TRAILERS if request else Phase.RESPONSE_TRAILERS


@dataclass(slots=True)
class _Direction:
    """Body state of one direction."""

    mode: BodyMode
    processor: BodyProcessor = field(default_factory=Passthrough)  # until the headers choose one
    decoder: Decoder | None = None  # undoes the content-encoding; also enforces the size limit
    had_content_length: bool = False
    streaming: bool = False  # released as it is masked (event streams, plain text), not held whole
    ended: bool = False  # the last body byte has been answered
    discard: bool = False  # closed early with an in-band error: the rest of the upstream body is dropped
    deferred_headers: ContinueHeaders | None = None  # response headers held until the body is masked
    media: str = ""
    status: str = ""  # the response's :status
    # For the session record, when one is kept: the decoded body as it came, and as it was sent on, each
    # up to the record's cap (None: not kept).
    original: bytearray | None = None
    masked: bytearray | None = None
    original_size: int = 0
    masked_size: int = 0


class _Admit:
    """An exchange's ``_admit``, for its request's body processor: held weakly, since the exchange holds
    the processor. A bound method there would make every exchange a reference cycle, kept (with its
    scanners and bodies) until the cycle collector runs, long after its stream ended."""

    __slots__ = ("_admit",)

    def __init__(self, exchange: Exchange) -> None:
        self._admit = weakref.WeakMethod(exchange._admit)

    def __call__(self, document: Any, size: int) -> tuple[Inspector, bool]:
        admit = self._admit()
        if admit is None:  # only a processor outliving its exchange gets here: refuse, never pass
            raise ProtocolError("the exchange of this body has ended")
        return admit(document, size)


class Exchange:
    def __init__(
        self,
        snapshot: Snapshot,
        protocol: ProtocolConfig,
        decision_id: str,
        trace: ExchangeTrace | None = None,
        unavailable: ExtProcError | None = None,
        caller: Principal | None = None,
        approvals: bool = False,
    ) -> None:
        """``unavailable``: the sidecar cannot serve now (its session record cannot be written); requests
        are answered with this error once their caller is known. ``caller``: a caller verified before
        (an exchange replayed from the session record); no token is then looked for. ``approvals``: the
        server can ask for approvals (``AwaitApproval``) and hand the result to ``resume``; without it an
        ``approve`` refuses with ``approval_required``."""
        for direction, mode in (
            (Direction.REQUEST, protocol.request_body_mode),
            (Direction.RESPONSE, protocol.response_body_mode),
        ):
            if mode not in SUPPORTED_BODY_MODES:
                raise ProtocolError(f"{direction.value} body mode {mode.value} is not supported")
        self._snapshot = snapshot
        self._unavailable = unavailable
        self._caller = caller
        self._started = time.time()
        self._clock = time.monotonic()
        self.trace = trace if trace is not None else _UNTRACED.begin({})
        self.decision_id = decision_id
        self.request_id = ""  # as the client or Envoy set it: only ever sent back to the client
        self.shown_request_id = ""  # the same, as logs, spans and the session record may show it
        self.method = ""
        self.model: str | None = None
        self.cut: str | None = None  # the error code a streamed answer was cut with
        self.passthrough = False
        self.finished = False
        self.deadline: float | None = None  # time.monotonic() by which a streamed answer must end
        self.route = ""
        self.groups: frozenset[str] = frozenset()
        self.unmasked_requested = False
        self.policy: LoadedPolicy | None = None
        self.shadowed: dict[str, list[str]] = {}  # shadow policy id -> what it would have refused
        self.would_refuse: list[str] = []  # what the acting policy, itself in shadow mode, would refuse
        self.refused: str | None = None  # the error code the exchange was refused with
        self.principal: Principal | None = None
        self._approvals = approvals
        self.approval_presented: str | None = None  # the caller's x-approval-id
        self.approval: Approval | None = None  # the approval this request asked for, or used
        self._approved = False
        self._request_event: Headers | None = None
        self._held_body: bytes | None = None  # a request body waiting for an approval, as it came
        self._closed = False
        self._request_actions: FindingActions | None = None
        self._response_actions: FindingActions | None = None
        self._header_scans = {Direction.REQUEST: HeaderScan(), Direction.RESPONSE: HeaderScan()}
        self._shown: dict[str, str] = {}  # _clean's answers: the outcome and the trace show the same names
        self._phase = Phase.START
        self._dirs = {
            Direction.REQUEST: _Direction(protocol.request_body_mode),
            Direction.RESPONSE: _Direction(protocol.response_body_mode),
        }
        audit = snapshot.settings.audit
        self._record_cap = audit.max_body_bytes
        if audit.record_path:
            for state in self._dirs.values():
                state.masked = bytearray()
                if audit.sealing_key_file:  # originals are kept only to be sealed
                    state.original = bytearray()

    @property
    def findings(self) -> dict[Direction, list[Finding]]:
        """Per direction, what the headers and the body held."""
        return {
            direction: self._header_scans[direction].findings + state.processor.findings
            for direction, state in self._dirs.items()
        }

    # -- dispatch -------------------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Reply]:
        """Answer one message from Envoy. Raises ProtocolError for anything out of order."""
        if not isinstance(event, Headers) and self._dirs[event.direction].discard:
            return [ContinueTrailers(event.direction)] if isinstance(event, Trailers) else []
        if self.finished:
            raise ProtocolError("message received after the exchange was answered in full")
        phase = _phase_of(event)
        self._check_order(event, phase)
        self._phase = phase
        if isinstance(event, Headers):
            if event.direction is Direction.REQUEST:
                return self._request_headers(event)
            return self._response_headers(event)
        if isinstance(event, Body):
            return self._body(event)
        return self._trailers(event)

    def _check_order(self, event: Event, phase: Phase) -> None:
        if self._phase is Phase.START:
            if phase is Phase.RESPONSE_HEADERS:
                # A local reply from Envoy or an earlier filter (a 401, a 413): no model data to scan.
                self.passthrough = True
                return
            if phase is not Phase.REQUEST_HEADERS:
                raise ProtocolError(f"stream opened with {phase.name.lower()}, not headers")
            return
        if isinstance(event, Body):
            state = self._dirs[event.direction]
            if state.mode is BodyMode.NONE:
                raise ProtocolError(f"{event.direction.value} body received in body mode NONE")
            if state.ended:
                raise ProtocolError(f"{event.direction.value} body received after its end")
            repeat_ok = state.mode is BodyMode.FULL_DUPLEX_STREAMED
            if phase < self._phase or (phase == self._phase and not repeat_ok):
                raise ProtocolError(f"{phase.name.lower()} out of order after {self._phase.name.lower()}")
            return
        if phase <= self._phase:
            raise ProtocolError(f"{phase.name.lower()} out of order after {self._phase.name.lower()}")

    # -- phases ---------------------------------------------------------------------------------------

    def _request_headers(self, event: Headers) -> list[Reply]:
        self.request_id = event.get("x-request-id") or ""
        self.shown_request_id = self._clean(self.request_id)
        self.route = (event.get(":path") or "").split("?", 1)[0]
        self.method = event.get(":method") or ""
        if not is_model_path(self.route, self._snapshot.settings.routes.model):
            # Envoy refuses these paths itself; this holds when its routes and the settings disagree.
            return self._reject(ClientError("no such route", code="not_found"))
        try:
            self.principal = self._authenticate(event)
        except AuthError as error:
            return self._reject(
                error,
                (("www-authenticate", f'Bearer error="invalid_token", error_description="{error.code}"'),),
            )
        if self.principal is not None:
            self.groups = self.principal.groups
        if self._unavailable is not None:
            return self._reject(self._unavailable)
        self.unmasked_requested = (event.get(UNMASKED_HEADER) or "").strip().lower() in ("1", "true", "yes")
        self.approval_presented = (event.get(APPROVAL_HEADER) or "").strip()[:64] or None
        self._request_event = event
        try:
            scanned = self._scan_request_headers(event)
        except ExtProcError as error:
            return self._reject(error)
        state = self._dirs[Direction.REQUEST]
        state.had_content_length = event.get("content-length") is not None
        metadata: dict[str, object] = {METADATA_NAMESPACE: {"decision_id": self.decision_id}}
        if event.end_of_stream or state.mode is BodyMode.NONE:
            state.ended = True
            try:
                self._admit(None, 0)
                changes = self._header_changes(state, scanned)
            except ExtProcError as error:
                return self._reject(error)
            return [ContinueHeaders(Direction.REQUEST, changes, metadata)]
        state.media = media_type(event)
        try:
            self._read(state, choose(event, state.mode, self._request_scope()))
            changes = self._header_changes(state, scanned)
        except ExtProcError as error:
            return self._reject(error)
        return [ContinueHeaders(Direction.REQUEST, changes, metadata)]

    def _request_scope(self) -> Scope:
        limit = self._snapshot.settings.limits.max_request_bytes
        # The policy the headers chose (_admit with no document chooses the same one) sets how long one
        # line of a streamed request may be; a body held whole is checked against it by _admit.
        return Scope(
            self._snapshot.inspector,
            BodyLimits(body=limit, stream=limit, event=self._request_limit()),
            admit=_Admit(self),
            json_as_text=self._json_as_text,
        )

    @staticmethod
    def _read(state: _Direction, chosen: Reading | Refused) -> None:
        """Reads the direction's body as the registry chose; raises what refuses it."""
        if isinstance(chosen, Refused):
            raise chosen.error
        state.processor, state.decoder = chosen.processor, chosen.decoder

    def _scan_request_headers(self, event: Headers) -> HeaderChanges:
        """Every request header but the caller's credential (removed, or the upstream's own), and the
        path with its query, scanned like the body and masked in place. The model is in the body, so the
        headers are decided under the policy the caller and the route choose; once the body chooses the
        final policy, ``_admit`` decides them again. Raises what refuses the request."""
        facts = Facts(self.groups, self.route, None)
        loaded = self._snapshot.policies.select(facts)
        shadows = self._snapshot.policies.shadows(facts)
        info = self._snapshot.rule_info
        self.policy = loaded
        self.shadowed = {shadow.id: [] for shadow in shadows}
        self._request_actions = FindingActions(
            loaded,
            "request",
            info,
            shadows=[FindingActions(s, "request", info) for s in shadows],
        )
        # Only what never reaches the model goes unscanned: the caller's credential headers when the
        # model server's own credential replaces them (without one they are forwarded as sent), and the
        # bearer token identity verified (the caller's own, not data).
        skip = {UNMASKED_HEADER, APPROVAL_HEADER}
        credential = self._snapshot.credential
        if credential.configured:
            skip |= {self._snapshot.settings.upstream.header, *credential.strip}
        items = event.items
        if self._snapshot.settings.identity.mode == "jwt" and "authorization" not in skip:
            verified = ("authorization", event.get("authorization"))
            items = tuple(pair for pair in items if pair != verified)
        return self._scan_headers(Direction.REQUEST, items, self._request_actions, skip).changes

    def _scan_headers(
        self,
        direction: Direction,
        items: tuple[tuple[str, str], ...],
        actions: FindingActions,
        skip: set[str],
    ) -> HeaderScan:
        scan = self._header_scans[direction] = HeaderScan()
        inspector = self._snapshot.inspector
        request = direction is Direction.REQUEST
        try:
            scan_headers(items, inspector.detector, inspector.masker, actions, skip=skip, into=scan)
        except HeaderNotMaskable as exc:
            if request:
                raise ClientError(str(exc), code="header_not_maskable") from exc
            raise UpstreamError(str(exc), code="upstream_header_not_maskable") from exc
        except HeadersTooLarge as exc:
            if request:
                raise ClientError(str(exc), code="headers_too_large") from exc
            raise UpstreamError(str(exc), code="upstream_too_large") from exc
        return scan

    def _redecide_headers(self) -> None:
        """The request headers' findings under the final policy (chosen with the model). What it refuses
        is refused; a value it masks that the headers' policy let through is refused too (the headers
        have been answered), so a policy chosen by the model is never looser on headers than on bodies."""
        actions = self._request_actions
        assert actions is not None
        for finding, applied in self._header_scans[Direction.REQUEST].applied:
            held = len(actions.awaiting)
            verdict = actions.verdict(finding)
            if len(actions.awaiting) > held:
                message = (
                    f"policy {actions.decisions.policy_id!r} needs an approval for {finding.entity} (rule "
                    f"{finding.rule_id}) in a request header, which cannot wait for one"
                )
                raise PolicyDenied(message, code="approval_required")
            if verdict.action == "mask" and applied != "mask":
                message = (
                    f"policy {actions.decisions.policy_id!r} masks {finding.entity} (rule {finding.rule_id}),"
                    " found in a request header that was let through before the model was known"
                )
                raise ClientError(message, code="header_not_maskable")

    def _authenticate(self, event: Headers) -> Principal | None:
        """The caller, per ``identity.mode``: none (no identity, the default policy), jwt (the bearer
        token verified here) or envoy (the payload Envoy's jwt_authn verified). Raises AuthError."""
        if self._caller is not None:
            return self._caller
        identity = self._snapshot.settings.identity
        if identity.mode == "jwt":
            assert self._snapshot.verifier is not None
            with self.trace.verifying():
                return self._snapshot.verifier.verify(bearer_token(event.get("authorization")))
        if identity.mode == "envoy":
            return principal_from_metadata(event.metadata, identity)
        return None

    # -- policy ---------------------------------------------------------------------------------------

    def _request_limit(self) -> int:
        limit = self._snapshot.settings.limits.max_request_bytes
        loaded = self.policy
        if loaded is not None and loaded.policy.enforce and loaded.limits.max_request_bytes is not None:
            limit = min(limit, loaded.limits.max_request_bytes)
        return limit

    def _admit(self, document: Any, size: int) -> tuple[Inspector, bool]:
        """Choose the request's policy and apply its request rules to ``document`` (the parsed JSON body,
        or None): allowed models, unmasked answers, size, blocked prompts, prompt tokens, ``max_tokens``.
        Raises the first violation. Policies in shadow mode that match are checked too; what they would
        have refused is only recorded. Returns the inspector that masks the request under the policy,
        and whether ``document`` was rewritten."""
        model = document.get("model") if isinstance(document, dict) else None
        self.model = model if isinstance(model, str) else None
        facts = Facts(self.groups, self.route, self.model)
        loaded = self._snapshot.policies.select(facts)
        shadows = self._snapshot.policies.shadows(facts)
        self.policy = loaded
        texts = prompt_texts(document) if document is not None else []
        self.shadowed = {}
        for shadow in shadows:
            refused = [v.code for v in self._check(shadow, document, size, texts, rewrite=False)[0]]
            self.shadowed[shadow.id] = refused
        violations, rewritten = self._check(loaded, document, size, texts, rewrite=loaded.policy.enforce)
        if violations:
            if loaded.policy.enforce:
                raise violations[0]
            self.would_refuse = [v.code for v in violations]
        info = self._snapshot.rule_info
        unmasked = self.unmasked_requested and bool(self.groups & set(loaded.policy.unmasked.groups))
        self._request_actions = FindingActions(
            loaded,
            "request",
            info,
            shadows=[FindingActions(s, "request", info) for s in shadows],
            hold=self._approvals and self._dirs[Direction.REQUEST].mode is BodyMode.BUFFERED,
            approved=self._approved,
            groups=self.groups,
        )
        self._response_actions = FindingActions(
            loaded,
            "response",
            info,
            unmasked=unmasked,
            shadows=[FindingActions(s, "response", info) for s in shadows],
        )
        self._redecide_headers()
        return self._snapshot.inspector.scoped(self._request_actions), rewritten

    def _check(
        self, loaded: LoadedPolicy, document: Any, size: int, texts: list[str], *, rewrite: bool
    ) -> tuple[list[ClientError], bool]:
        """What ``loaded`` refuses in the request, in order; with ``rewrite``, ``max_tokens`` is capped
        in ``document``, and whether that happened is returned too."""
        policy = loaded.policy
        violations: list[ClientError] = []
        model = document.get("model") if isinstance(document, dict) else None
        if isinstance(model, str) and not glob_match(model, policy.models):
            message = f"model {model!r} is not allowed for you (policy {loaded.id!r})"
            violations.append(ClientError(message, code="model_not_allowed"))
        elif isinstance(document, dict) and not isinstance(model, str) and "*" not in policy.models:
            # A server that serves one model (TGI, llama.cpp) or a default one takes a body without one.
            message = f"the request names no model; policy {loaded.id!r} allows only some models"
            violations.append(ClientError(message, code="model_not_allowed"))
        if isinstance(document, dict):
            carried = [(kind, where) for kind, where in media_in(document) if kind not in policy.media]
            if carried:
                kind, where = carried[0]
                message = (
                    f"the request carries or asks for {kind} ({where}), which cannot be scanned; "
                    f"policy {loaded.id!r} does not let {kind} through"
                )
                violations.append(ClientError(message, code="media_not_allowed"))
        if self.unmasked_requested and not self.groups & set(policy.unmasked.groups):
            message = f"unmasked answers are not allowed for you (policy {loaded.id!r})"
            violations.append(ClientError(message, code="unmasked_not_allowed"))
        limits = loaded.limits
        if limits.max_request_bytes is not None and size > limits.max_request_bytes:
            message = f"request body exceeds {limits.max_request_bytes} bytes (policy {loaded.id!r})"
            violations.append(ClientError(message, code="body_too_large"))
        for rule_id, pattern in loaded.blocked:
            if any(pattern.search(text) for text in texts):
                message = f"the prompt matches blocked pattern {rule_id!r} (policy {loaded.id!r})"
                violations.append(ClientError(message, code="prompt_blocked"))
                break
        if limits.max_prompt_tokens is not None and texts:
            estimated = estimate_tokens(texts)
            if estimated > limits.max_prompt_tokens:
                message = (
                    f"the prompt is about {estimated} tokens; at most {limits.max_prompt_tokens} are allowed"
                )
                violations.append(ClientError(message, code="prompt_too_long"))
        rewritten = False
        if limits.max_tokens is not None and isinstance(document, dict):
            # Every API's spelling of the output-token limit (routes.OUTPUT_TOKEN_FIELDS) is held to it.
            found = [(p, v) for p in OUTPUT_TOKEN_FIELDS for ok, v in [get_field(document, p)] if ok]
            over = [(p, v) for p, v in found if not within(v, limits.max_tokens)]
            if over and limits.max_tokens_over == "refuse":
                name, value = ".".join(over[0][0]), over[0][1]
                message = f"{name} {json.dumps(value)[:32]} is over the {limits.max_tokens} allowed"
                violations.append(ClientError(message, code="max_tokens_too_large"))
            elif rewrite and (over or not found):
                for path in [p for p, _ in over] or [output_token_field(self.route)]:
                    if not set_field(document, path, limits.max_tokens):
                        message = f"{'.'.join(path[:-1])} is not an object; {path[-1]} cannot be capped"
                        violations.append(ClientError(message, code="max_tokens_too_large"))
                        break
                    rewritten = True
        return violations, rewritten

    @property
    def limits(self) -> LimitSettings:
        """The answer's limits: the settings', lowered by the policy's own where it sets them."""
        limits = self._snapshot.settings.limits
        if self.policy is None or not self.policy.policy.enforce:
            return limits
        own = self.policy.limits
        lowered: dict[str, float] = {}
        for name in ("max_response_bytes", "max_stream_bytes", "max_stream_seconds"):
            value = getattr(own, name)
            current = getattr(limits, name)
            if value is not None and (not current or value < current):
                lowered[name] = value
        return limits.model_copy(update=lowered) if lowered else limits

    def _response_inspector(self) -> Inspector:
        if self._response_actions is None:  # no request body was admitted: decide on what is known
            self._admit(None, 0)
        assert self._response_actions is not None
        return self._snapshot.inspector.scoped(self._response_actions)

    def _let_through(self, direction: Direction) -> bool:
        """Whether a finding went out unmasked in ``direction``: allowed (also an unmasked answer),
        approved, or decided by a policy that does not act (shadow mode). Block sends nothing on."""
        actions = self._request_actions if direction is Direction.REQUEST else self._response_actions
        if actions is None or not actions.decisions.made:
            return False
        if not actions.decisions.enforce or any(a == "allow" for _, a in actions.decisions.made):
            return True
        # An approved value (or one of an exempt caller) is recorded as the approve decision it was, and
        # went out as written.
        return actions.approved_through

    def _clean(self, text: str) -> str:
        """A client-chosen string (model, path, request id) as it may be shown: percent-decoded, then
        masked. Envoy's own UUID request ids come out as they went in."""
        if not text:
            return text
        shown = self._shown.get(text)
        if shown is None:
            # The route, the method and the model repeat across exchanges, and the request id was read
            # clean among the headers: most are answered from the detector's memory of clean texts.
            inspector = self._snapshot.inspector
            view = unquote(text)
            shown = self._shown[text] = inspector.masker.apply(view, scan_short(inspector.detector, view))
        return shown

    def outcome(self, error_code: str | None = None) -> Outcome:
        """What the exchange came to. ``error_code``: the stream was aborted with it. Header findings are
        kept apart (``request_headers``, ``response_headers``): their offsets are in a header's value."""
        findings = {
            d.value: tuple(state.processor.findings)
            for d, state in self._dirs.items()
            if state.processor.findings
        }
        for direction, scan in self._header_scans.items():
            if scan.findings:
                findings[f"{direction.value}_headers"] = tuple(scan.findings)
        entity_of = {f.rule_id: f.entity for found in findings.values() for f in found}
        request, response = self._request_actions, self._response_actions
        actions = _actions(request, response, entity_of)
        shadow = {
            shadow_id: Shadowed(
                tuple(codes),
                _actions(
                    request.shadows[index] if request is not None else None,
                    response.shadows[index] if response is not None else None,
                    entity_of,
                ),
            )
            for index, (shadow_id, codes) in enumerate(self.shadowed.items())
        }
        entities: dict[str, int] = {}
        for found in findings.values():
            for finding in found:
                entities[finding.entity] = entities.get(finding.entity, 0) + 1
        enforce = self.policy.policy.enforce if self.policy is not None else True
        if error_code is not None:
            decision = "error"
        elif self.passthrough:
            decision = "passthrough"
        elif self.refused is not None:
            decision = "refused"
        elif self.cut is not None:
            decision = "cut"
        elif not self.finished:
            decision = "incomplete"  # the stream ended before the answer did (client gone, Envoy reset)
        elif enforce and any(action == "mask" for made in actions.values() for _, _, action in made):
            decision = "masked"
        else:
            decision = "allowed"
        principal = self.principal
        return Outcome(
            decision_id=self.decision_id,
            decision=decision,
            request_id=self.shown_request_id,
            error_code=error_code or self.refused or self.cut,
            policy=self.policy.id if self.policy is not None else None,
            enforce=enforce,
            actions=actions,
            findings=findings,
            entities=entities,
            rules=tuple(dict.fromkeys(r for found in findings.values() for f in found for r in f.rule_ids)),
            would_refuse=tuple(self.would_refuse),
            shadow=shadow,
            subject=principal.subject if principal is not None else None,
            subject_hash=(
                self._snapshot.subject_hash(principal.issuer, principal.subject) if principal else None
            ),
            issuer=principal.issuer if principal is not None else None,
            groups=tuple(sorted(self.groups)),
            unmasked=bool(self._response_actions is not None and self._response_actions.unmasked),
            unmasked_requested=self.unmasked_requested,
            route=self._clean(self.route),
            method=self._clean(self.method),
            model=self._clean(self.model) if self.model is not None else None,
            approval_id=self.approval.id if self.approval is not None else None,
            approval_status=self.approval.status if self.approval is not None else None,
            snapshot=self._snapshot.version,
        )

    def recorded(self) -> Recorded:
        """The bodies kept for the session record (none unless one is kept)."""
        bodies: dict[Direction, RecordedBody | None] = {}
        for direction, state in self._dirs.items():
            if state.masked is None or not (state.media or state.status or state.original_size):
                bodies[direction] = None
                continue
            bodies[direction] = RecordedBody(
                content_type=state.media,
                original=None if state.original is None else bytes(state.original),
                original_bytes=state.original_size,
                # A body the policy let a finding through in (allow, unmasked answers, shadow mode) holds
                # that value in clear: the record keeps it only sealed, with the originals.
                masked=None if self._let_through(direction) else bytes(state.masked),
                masked_bytes=state.masked_size,
                status=state.status,
            )
        return Recorded(
            started=self._started,
            duration=time.monotonic() - self._clock,
            request=bodies[Direction.REQUEST],
            response=bodies[Direction.RESPONSE],
        )

    @property
    def _json_as_text(self) -> bool:
        return self._snapshot.settings.detect.unparseable == "text"

    def _header_changes(self, state: _Direction, scanned: HeaderChanges = _NO_CHANGES) -> HeaderChanges:
        """The decision id; for a body sent on decoded, no content-encoding (its length is set with the
        body, or removed by Envoy in FULL_DUPLEX_STREAMED); upstream, no unmasking request. ``scanned``:
        the headers masked in place, unless set or removed here anyway."""
        changes: tuple[tuple[str, str], ...] = ((DECISION_HEADER, self.decision_id),)
        remove: tuple[str, ...] = ()
        if state is self._dirs[Direction.REQUEST]:
            remove += (UNMASKED_HEADER, APPROVAL_HEADER)
            credential = self._snapshot.credential
            if credential.configured:
                changes += (credential.header(),)
                remove += credential.strip
        if state.decoder is not None and state.decoder.codings:
            remove += ("content-encoding",)
        ours = {name for name, _ in changes} | set(remove)
        return HeaderChanges(
            set=tuple(pair for pair in scanned.set if pair[0] not in ours) + changes,
            remove=tuple(name for name in scanned.remove if name not in ours) + remove,
            append=tuple(pair for pair in scanned.append if pair[0] not in ours),
        )

    def _response_headers(self, event: Headers) -> list[Reply]:
        state = self._dirs[Direction.RESPONSE]
        if self.passthrough:
            state.ended = event.end_of_stream or state.mode is BodyMode.NONE
            return [ContinueHeaders(Direction.RESPONSE)]
        self._close_request_body()
        try:
            self._response_inspector()
            assert self._response_actions is not None
            actions = self._response_actions
            scanned = self._scan_headers(Direction.RESPONSE, event.items, actions, set()).changes
        except ExtProcError as error:
            return self._reject(error)
        if event.end_of_stream or state.mode is BodyMode.NONE:
            state.ended = True
            self.finished = True
            return [ContinueHeaders(Direction.RESPONSE, self._header_changes(state, scanned))]
        state.media = media_type(event)
        state.status = event.get(":status") or ""
        try:
            inspector = self._response_inspector()
        except ExtProcError as error:
            return self._reject(error)
        limits = self.limits
        scope = Scope(
            inspector,
            BodyLimits(
                body=limits.max_response_bytes, stream=limits.max_stream_bytes, event=limits.max_event_bytes
            ),
            json_as_text=self._json_as_text,
        )
        try:
            self._read(state, choose(event, state.mode, scope))
        except ExtProcError as error:
            return self._reject(error)
        streamed = state.mode is BodyMode.FULL_DUPLEX_STREAMED
        # Released as it is masked, or (sniffed) perhaps: a deadline applies, what it holds is traced.
        state.streaming = streamed and state.processor.streaming is not False
        if limits.max_stream_seconds and state.streaming:
            self.deadline = time.monotonic() + limits.max_stream_seconds
        reply = ContinueHeaders(Direction.RESPONSE, self._header_changes(state, scanned))
        if not streamed:
            state.had_content_length = event.get("content-length") is not None
            return [reply]
        # FULL_DUPLEX_STREAMED. A body known to stream is released as it is masked. A body held whole is
        # answered only once it is masked (holding the headers answer back keeps an error status
        # possible), and so is one whose first bytes have yet to choose.
        if state.processor.streaming:
            return [reply]
        state.deferred_headers = reply
        return []

    def _close_request_body(self) -> None:
        """The upstream answered: whatever of the request body is still held will never be sent, and no
        approval can send it again, so its headers are no longer kept for one."""
        state = self._dirs[Direction.REQUEST]
        state.ended = True
        self._request_event = None

    def _body(self, event: Body) -> list[Reply]:
        state = self._dirs[event.direction]
        buffered = state.mode is BodyMode.BUFFERED
        last = event.end_of_stream or buffered
        try:
            out = self._feed(event.direction, event.data, last)
        except ExtProcError as error:
            return self._body_failed(event.direction, error)
        if last:
            self._end(event.direction)
        if buffered and event.direction is Direction.REQUEST:
            waiting = self._awaiting_approval(event.data, out)
            if waiting is not None:
                return waiting
        if buffered:
            if out == event.data and (state.decoder is None or not state.decoder.codings):
                return [ReplaceBody(event.direction, None)]
            changes = HeaderChanges()
            if state.had_content_length:
                changes = HeaderChanges(set=(("content-length", str(len(out))),))
            return [ReplaceBody(event.direction, out, changes)]
        replies: list[Reply] = []
        if last or state.processor.streaming:
            replies.extend(self._release_headers(state))
        if out or event.end_of_stream:
            replies.append(StreamChunk(event.direction, out, event.end_of_stream))
        return replies

    def _feed(self, direction: Direction, data: bytes, last: bool) -> bytes:
        """Decode and mask one body chunk; with ``last``, flush everything held."""
        state = self._dirs[direction]
        decoder = state.decoder
        processor = state.processor
        with self.trace.scanning(direction, len(data)):
            try:
                plain = data if decoder is None else decoder.feed(data)
                self._keep(state, plain, original=True)
                out = processor.feed(plain)
                if last and decoder is not None:
                    rest = decoder.finish()
                    self._keep(state, rest, original=True)
                    out += processor.feed(rest)
            except DecodeError as exc:
                if direction is Direction.REQUEST:
                    raise ClientError(str(exc), code="invalid_content_encoding") from exc
                raise UpstreamError(str(exc)) from exc
            if last:
                out += processor.finish()
        self._keep(state, out, original=False)
        if last:
            self.trace.scanned(direction)
        elif state.streaming:
            self.trace.held(direction, processor.held)
        return out

    def _keep(self, state: _Direction, data: bytes, *, original: bool) -> None:
        """Keeps ``data`` for the session record, up to its cap; counts it all."""
        if original:
            state.original_size += len(data)
        else:
            state.masked_size += len(data)
        kept = state.original if original else state.masked
        if kept is None or not data:
            return
        room = self._record_cap - len(kept)
        if room > 0:
            kept += data[:room]

    def _trailers(self, event: Trailers) -> list[Reply]:
        state = self._dirs[event.direction]
        replies: list[Reply] = []
        if not state.ended and state.mode is BodyMode.FULL_DUPLEX_STREAMED:
            # The body ended without end_of_stream because trailers follow: flush what is held first.
            try:
                out = self._feed(event.direction, b"", last=True)
            except ExtProcError as error:
                return self._body_failed(event.direction, error)
            replies.extend(self._release_headers(state))
            if out:
                replies.append(StreamChunk(event.direction, out, False))
        self._end(event.direction)
        replies.append(ContinueTrailers(event.direction))
        return replies

    # -- approvals ------------------------------------------------------------------------------------

    def _awaiting_approval(self, data: bytes, masked: bytes) -> list[Reply] | None:
        """When the policy held values of the request body for an approval: what the server must do
        (ask for a new approval, or use the one the caller presented), or a refusal. None otherwise."""
        actions = self._request_actions
        if actions is None or not actions.awaiting:
            return None
        principal = self.principal
        if principal is None:
            error = PolicyDenied(
                "this request needs an approval, and approvals are granted to authenticated callers only",
                code="approval_needs_identity",
            )
            return self._reject(error)
        self._held_body = data
        caller = Person(principal.subject, principal.issuer, tuple(sorted(principal.groups)))
        digest = hashlib.sha256(data).hexdigest()
        if self.approval_presented is not None:
            return [AwaitApproval(redeem=self.approval_presented, caller=caller, body_digest=digest)]
        spec = actions.awaiting[0][1]  # the first value held decides who approves, and how it waits
        request = ApprovalRequest(
            id=uuid.uuid4().hex,
            created=time.time(),
            requester=caller,
            route=self._clean(self.route),
            model=self._clean(self.model) if self.model is not None else None,
            prompt=masked[:APPROVAL_PROMPT_BYTES].decode("utf-8", "replace"),
            rule_ids=tuple(dict.fromkeys(r for finding, _ in actions.awaiting for r in finding.rule_ids)),
            body_digest=digest,
            policy_id=actions.decisions.policy_id,
            approver_groups=tuple(spec.approver_groups),
            min_approvals=spec.min_approvals,
            require_all_groups=spec.require_all_groups,
            mode=spec.mode,
            ttl_seconds=spec.ttl_seconds,
            decision_id=self.decision_id,
        )
        hold = spec.mode == "hold"
        return [AwaitApproval(request, None, caller, digest, hold, spec.hold_seconds if hold else 0.0)]

    def resume(self, result: Approval | ApprovalError, approve_url: str = "") -> list[Reply]:
        """The request held by ``AwaitApproval`` goes on, now that ``result`` is known: approved (or a
        grant used), it is masked again with the approved values let through and sent to the model;
        otherwise refused, with the approval's id, status and ``approve_url`` in the error body."""
        if isinstance(result, ApprovalError):
            self._held_body = None
            extra = {"approval_id": self.approval_presented} if self.approval_presented else {}
            return self._reject(result, body=extra)
        self.approval = result
        if result.status in ("approved", "used"):
            return self._send_approved()
        self._held_body = None
        code, message = {
            "denied": ("approval_denied", f"the approval was denied: {result.reason}"),
            "expired": ("approval_expired", "the approval expired before anyone decided it"),
        }.get(
            result.status,
            (
                "approval_required",
                "this request needs an approval; once approved, send it again with header "
                f"{APPROVAL_HEADER}: {result.id}",
            ),
        )
        body = {"approval_id": result.id, "status": result.status, "approve_url": approve_url}
        return self._reject(PolicyDenied(message, code=code), body=body)

    def _send_approved(self) -> list[Reply]:
        """The held request body read again from the start, with the approval: a fresh reading, so that
        nothing of the first (its findings, its masked output) is counted twice."""
        data, event = self._held_body, self._request_event
        assert data is not None
        assert event is not None
        self._held_body = None
        self._approved = True
        state = self._dirs[Direction.REQUEST]
        state.ended = False
        state.original_size = state.masked_size = 0
        for kept in (state.original, state.masked):
            if kept is not None:
                del kept[:]
        try:
            self._read(state, choose(event, state.mode, self._request_scope()))
        except ExtProcError as error:
            return self._reject(error)
        return self._body(Body(Direction.REQUEST, data, True))

    def close(self) -> None:
        """Releases what the exchange holds: a request body waiting for an approval, and the scanners of
        a body still streaming (the stream ended early or was cancelled). Safe to call more than once."""
        self._held_body = None
        self._request_event = None
        if self._closed:
            return
        self._closed = True
        for state in self._dirs.values():
            if not state.ended:
                with contextlib.suppress(Exception):
                    state.processor.cut()

    def expire(self) -> list[Reply]:
        """The stream ran past ``limits.max_stream_seconds``: end the answer here."""
        self.deadline = None
        state = self._dirs[Direction.RESPONSE]
        if state.ended or state.discard:
            return []
        seconds = self.limits.max_stream_seconds
        error = UpstreamError(f"the answer ran longer than {seconds:g} s", code="upstream_timeout")
        return self._body_failed(Direction.RESPONSE, error)

    # -- helpers --------------------------------------------------------------------------------------

    def _end(self, direction: Direction) -> None:
        self._dirs[direction].ended = True
        if direction is Direction.RESPONSE:
            self.finished = True

    @staticmethod
    def _release_headers(state: _Direction) -> list[Reply]:
        if state.deferred_headers is None:
            return []
        reply, state.deferred_headers = state.deferred_headers, None
        return [reply]

    def _body_failed(self, direction: Direction, error: ExtProcError) -> list[Reply]:
        state = self._dirs[direction]
        streaming_response = (
            direction is Direction.RESPONSE
            and state.mode is BodyMode.FULL_DUPLEX_STREAMED
            and state.deferred_headers is None
        )
        if not streaming_response:
            self.trace.scanned(direction, error.code)
            return self._reject(error)
        # Response headers are already on their way to the client: an error status is no longer possible.
        # An event stream (SSE or NDJSON) releases what its finished texts still hold, masked, then ends
        # with an in-band error event; a body whose format cannot say so (plain text) is cut by resetting
        # the stream (the server aborts). Either way nothing more of the upstream body is released.
        processor = state.processor
        payload = self.error_body(error)
        terminal = processor.terminal(payload)
        if terminal is None:
            raise error
        self._end(direction)
        state.discard = True
        self.cut = error.code
        self.trace.scanned(direction, error.code)
        released = processor.cut()
        # The record keeps the end of the stream with the request id as it may be shown.
        shown = processor.terminal({**payload, "request_id": self.shown_request_id}) or b""
        self._keep(state, released + shown, original=False)
        return [StreamChunk(direction, released + terminal, True)]

    def error_body(self, error: ExtProcError) -> dict[str, str]:
        return {"error": error.code, "message": error.message, "request_id": self.request_id}

    def _reject(
        self,
        error: ExtProcError,
        extra: tuple[tuple[str, str], ...] = (),
        body: Mapping[str, str] | None = None,
    ) -> list[Reply]:
        self.finished = True
        self.refused = error.code
        payload = json.dumps({**self.error_body(error), **(body or {})}, separators=(",", ":")).encode()
        headers = (("content-type", "application/json"), (DECISION_HEADER, self.decision_id), *extra)
        return [
            Reject(status=error.http_status, body=payload, headers=headers, details=f"extproc_{error.code}")
        ]


def _actions(
    request: FindingActions | None, response: FindingActions | None, entity_of: dict[str, str]
) -> Actions:
    """``(rule, entity, action)`` per decision a policy made, per direction."""
    return {
        direction: tuple((rule, entity_of.get(rule, ""), action) for rule, action in made.decisions.made)
        for direction, made in (("request", request), ("response", response))
        if made is not None and made.decisions.made
    }
