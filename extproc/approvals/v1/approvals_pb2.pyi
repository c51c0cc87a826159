import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    STATUS_PENDING: _ClassVar[Status]
    STATUS_APPROVED: _ClassVar[Status]
    STATUS_DENIED: _ClassVar[Status]
    STATUS_EXPIRED: _ClassVar[Status]
    STATUS_USED: _ClassVar[Status]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_HOLD: _ClassVar[Mode]
    MODE_TICKET: _ClassVar[Mode]
STATUS_UNSPECIFIED: Status
STATUS_PENDING: Status
STATUS_APPROVED: Status
STATUS_DENIED: Status
STATUS_EXPIRED: Status
STATUS_USED: Status
MODE_UNSPECIFIED: Mode
MODE_HOLD: Mode
MODE_TICKET: Mode

class ListPendingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPendingResponse(_message.Message):
    __slots__ = ("approvals",)
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    approvals: _containers.RepeatedCompositeFieldContainer[Approval]
    def __init__(self, approvals: _Optional[_Iterable[_Union[Approval, _Mapping]]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ApproveRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DenyRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Person(_message.Message):
    __slots__ = ("subject", "issuer", "groups")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    subject: str
    issuer: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, subject: _Optional[str] = ..., issuer: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ...) -> None: ...

class ApprovalRequest(_message.Message):
    __slots__ = ("id", "created", "requester", "route", "model", "prompt", "rule_ids", "body_digest", "policy_id", "approver_groups", "min_approvals", "require_all_groups", "mode", "ttl_seconds", "decision_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RULE_IDS_FIELD_NUMBER: _ClassVar[int]
    BODY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVER_GROUPS_FIELD_NUMBER: _ClassVar[int]
    MIN_APPROVALS_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_ALL_GROUPS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    created: _timestamp_pb2.Timestamp
    requester: Person
    route: str
    model: str
    prompt: str
    rule_ids: _containers.RepeatedScalarFieldContainer[str]
    body_digest: str
    policy_id: str
    approver_groups: _containers.RepeatedScalarFieldContainer[str]
    min_approvals: int
    require_all_groups: bool
    mode: Mode
    ttl_seconds: float
    decision_id: str
    def __init__(self, id: _Optional[str] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., requester: _Optional[_Union[Person, _Mapping]] = ..., route: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., rule_ids: _Optional[_Iterable[str]] = ..., body_digest: _Optional[str] = ..., policy_id: _Optional[str] = ..., approver_groups: _Optional[_Iterable[str]] = ..., min_approvals: _Optional[int] = ..., require_all_groups: _Optional[bool] = ..., mode: _Optional[_Union[Mode, str]] = ..., ttl_seconds: _Optional[float] = ..., decision_id: _Optional[str] = ...) -> None: ...

class Vote(_message.Message):
    __slots__ = ("approver", "approve", "at", "reason")
    APPROVER_FIELD_NUMBER: _ClassVar[int]
    APPROVE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    approver: Person
    approve: bool
    at: _timestamp_pb2.Timestamp
    reason: str
    def __init__(self, approver: _Optional[_Union[Person, _Mapping]] = ..., approve: _Optional[bool] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("request", "status", "votes", "decided_at", "used_at", "reason", "revision", "approve_url", "decidable")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    USED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    APPROVE_URL_FIELD_NUMBER: _ClassVar[int]
    DECIDABLE_FIELD_NUMBER: _ClassVar[int]
    request: ApprovalRequest
    status: Status
    votes: _containers.RepeatedCompositeFieldContainer[Vote]
    decided_at: _timestamp_pb2.Timestamp
    used_at: _timestamp_pb2.Timestamp
    reason: str
    revision: int
    approve_url: str
    decidable: bool
    def __init__(self, request: _Optional[_Union[ApprovalRequest, _Mapping]] = ..., status: _Optional[_Union[Status, str]] = ..., votes: _Optional[_Iterable[_Union[Vote, _Mapping]]] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., used_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., revision: _Optional[int] = ..., approve_url: _Optional[str] = ..., decidable: _Optional[bool] = ...) -> None: ...
