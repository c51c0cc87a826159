"""One validated settings object, read from a YAML file and the environment.

Nothing else in the package reads environment variables. Precedence, highest first: keyword arguments
(the command line), ``EXTPROC_*`` environment variables (nested with ``__``, e.g.
``EXTPROC_SERVER__GRPC_ADDRESS``), the YAML file, the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from extproc import yamlfiles
from extproc.errors import ConfigError
from extproc.routes import DEFAULT_MODEL_PATHS, check_pattern

CONFIG_ENV = "EXTPROC_CONFIG"
APPROVER_TOKEN_ENV = "EXTPROC_APPROVER_TOKEN"  # noqa: S105 (the variable's name, not a token)
"""The approver's own token for `extproc approvals ...`: a credential of the person at the terminal,
not a setting of the sidecar, so it is read here but never part of ``Settings``."""
MiB = 1024 * 1024
MAX_WORKERS = 64
"""More workers than this is a mistake (a Pod's CPUs, not a host's): each holds a whole snapshot."""
REPO_RULES = Path(__file__).resolve().parent.parent / "rules"
REPO_POLICIES = REPO_RULES / "policies"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


class ServerSettings(_Section):
    grpc_address: str = Field("127.0.0.1:50051", description="ext_proc gRPC listen address (port 0: any)")
    admin_address: str = Field("127.0.0.1:9090", description="admin HTTP address: /healthz, /readyz")
    max_message_bytes: int = Field(
        32 * MiB, ge=MiB, description="largest gRPC message accepted; keep above Envoy's body buffer limit"
    )
    drain_seconds: float = Field(
        3.0, ge=0, description="after SIGTERM: NOT_SERVING is reported this long before the listener closes"
    )
    grace_seconds: float = Field(20.0, ge=0, description="after draining: time open streams get to finish")
    workers: int = Field(
        1,
        ge=1,
        le=MAX_WORKERS,
        description="worker processes serving the one gRPC address (SO_REUSEPORT), each with its own "
        "snapshot, under a supervisor that owns the admin address; more than 1 needs approvals.store redis",
    )
    reload_watch_seconds: float = Field(
        2.0,
        ge=0,
        description="how often the rule, policy, key and settings files are checked for changes "
        "(a change reloads them); 0: only SIGHUP and POST /reload reload",
    )

    _addr = field_validator("grpc_address", "admin_address")(_check_address)


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


class LimitSettings(_Section):
    max_request_bytes: int = Field(16 * MiB, ge=1, description="largest request body scanned")
    max_response_bytes: int = Field(16 * MiB, ge=1, description="largest buffered response body scanned")
    max_stream_bytes: int = Field(
        256 * MiB, ge=1, description="largest streamed answer (SSE, NDJSON, text); it is cut there"
    )
    max_stream_seconds: float = Field(
        600.0, ge=0, description="longest streamed answer, from its headers; it is cut there (0: no limit)"
    )
    max_event_bytes: int = Field(
        1 * MiB,
        ge=1024,
        description="largest single server-sent event or NDJSON line; a longer one ends the stream",
    )


class DetectSettings(_Section):
    rules: list[str] = Field(
        default_factory=lambda: [str(REPO_RULES)], description="rule files, or folders of *.yaml rule files"
    )
    max_match_chars: int = Field(
        1024, ge=16, le=65536, description="how far a pattern with no upper length is searched"
    )
    edm_key_file: str | None = Field(None, description="key for hashed exact-match lists (HMAC-SHA256)")
    cache_dir: str | None = Field(
        None, description="private folder for compiled Hyperscan databases (faster restarts); unset: none"
    )
    unparseable: Literal["refuse", "text"] = Field(
        "refuse", description="a JSON body that does not parse: refuse it, or scan and mask it as plain text"
    )


class MaskSettings(_Section):
    hash_key_file: str | None = Field(
        None, description="key for the `hash` strategy; without one a random key is made at start-up"
    )


class UpstreamSettings(_Section):
    credential_file: str | None = Field(
        None,
        description="file holding the model server's credential (a mounted Secret); re-read when it changes",
    )
    credential_env: str | None = Field(None, description="or: the environment variable holding it")
    header: str = Field("authorization", description="the header the credential goes in (e.g. x-api-key)")
    scheme: str = Field("Bearer", description="prefix before the credential; empty for none")
    strip_headers: list[str] = Field(
        default_factory=lambda: ["authorization", "x-api-key", "api-key"],
        description="callers' credential headers, never sent upstream when a credential is set",
    )

    @field_validator("header", "strip_headers")
    @classmethod
    def _lower(cls, value: str | list[str]) -> str | list[str]:
        return value.lower() if isinstance(value, str) else [v.lower() for v in value]

    @model_validator(mode="after")
    def _one_source(self) -> UpstreamSettings:
        if self.credential_file and self.credential_env:
            raise ValueError("set credential_file or credential_env, not both")
        return self


class RouteSettings(_Section):
    model: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MODEL_PATHS),
        min_length=1,
        description="the model server's paths forwarded, scanned: '/v1/' (a prefix, ending in '/') or "
        "'/api/chat' (one path); every other path is refused with 404 not_found",
    )

    @field_validator("model")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        return [check_pattern(pattern) for pattern in value]


class PolicySettings(_Section):
    paths: list[str] = Field(
        default_factory=lambda: [str(REPO_POLICIES)],
        description="policy files, or folders of *.yaml policy files (default: the repo's rules/policies/)",
    )


class WebhookSettings(_Section):
    url: str = Field("", description="POSTed to when an approval starts waiting; empty: no notifications")
    format: Literal["generic", "slack"] = Field(
        "generic", description="generic: the approval as JSON; slack: a Slack-compatible {text, blocks} body"
    )
    timeout_seconds: float = Field(5.0, gt=0, description="per attempt")
    attempts: int = Field(5, ge=1, le=20, description="tries per notification, with exponential backoff")
    queue_size: int = Field(
        1000, ge=1, description="notifications waiting to be sent; beyond it they are dropped"
    )


class ApprovalSettings(_Section):
    store: Literal["memory", "redis"] = Field(
        "memory", description="memory: one replica; redis: approvals shared by every replica"
    )
    redis_url: str = Field("", description="redis://host:port/db, for store: redis")
    key_prefix: str = Field("extproc:approvals:", description="prefix of every Redis key and channel")
    public_url: str = Field(
        "",
        description="the approval page's base URL as approvers reach it (tickets and notifications link it)",
    )
    sweep_seconds: float = Field(
        30.0, gt=0, description="how often pending approvals past their ttl are expired"
    )
    api_address: str = Field(
        "127.0.0.1:50052",
        description="the approvers' gRPC API (proto/extproc/approvals/v1); port 0: any free port; empty: "
        "not served",
    )
    webhook: WebhookSettings = WebhookSettings()

    @field_validator("api_address")
    @classmethod
    def _address_or_empty(cls, value: str) -> str:
        return value if value == "" else _check_address(value)

    @field_validator("redis_url", "public_url")
    @classmethod
    def _set_by_the_operator(cls, value: str) -> str:
        return _no_placeholder(value, "it")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> ApprovalSettings:
        if self.store == "redis" and not self.redis_url:
            raise ValueError("store: redis needs redis_url")
        return self


PLACEHOLDER = "CHANGE-ME"
"""Marks a value the shipped settings leave for the operator to set (deploy/kubernetes): refused at load."""


def _no_placeholder(value: str, what: str) -> str:
    if PLACEHOLDER in value:
        raise ValueError(f"{value!r} is the shipped placeholder: set {what} before the sidecar can start")
    return value


JWT_ALGORITHMS: frozenset[str] = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""Signature algorithms an issuer may allow: public-key ones only, so a JWKS of public keys can check them."""


class IssuerSettings(_Section):
    """One trusted token issuer (an OIDC provider): its keys, its audiences and how to read its claims."""

    issuer: str = Field(min_length=1, description="exact `iss` value of this issuer's tokens")
    audiences: list[str] = Field(
        min_length=1,
        description="the token's `aud` must contain one of these (never empty: any aud is unsafe)",
    )
    jwks_file: str | None = Field(None, description="JWKS file (re-read when it changes); or jwks_url")
    jwks_url: str | None = Field(
        None, description="JWKS URL, fetched in the background; https, or http to a loopback address only"
    )
    algorithms: list[str] = Field(
        default_factory=lambda: ["RS256"],
        description="signature algorithms accepted from this issuer; the token's `alg` never widens this",
    )
    groups_claim: str = Field(
        "groups", min_length=1, description="dotted path of the groups claim, e.g. realm_access.roles"
    )
    claims: list[str] = Field(
        default_factory=list, description="other claims (dotted paths) copied into the principal, e.g. email"
    )

    @field_validator("issuer")
    @classmethod
    def _issuer_set(cls, value: str) -> str:
        return _no_placeholder(value, "your identity provider's issuer (the exact `iss` of its tokens)")

    @field_validator("audiences")
    @classmethod
    def _audiences_set(cls, value: list[str]) -> list[str]:
        for audience in value:
            _no_placeholder(audience, "the audience your identity provider puts in `aud`")
        return value

    @field_validator("jwks_file")
    @classmethod
    def _jwks_file_set(cls, value: str | None) -> str | None:
        return value if value is None else _no_placeholder(value, "the issuer's JWKS file")

    @field_validator("algorithms")
    @classmethod
    def _public_key_algorithms(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one algorithm")
        for name in value:
            if name.lower() == "none":
                raise ValueError("'none' is not an algorithm: it would accept unsigned tokens")
            if name.upper().startswith("HS"):
                raise ValueError(
                    f"{name} is a shared-secret algorithm: a JWKS holds public keys, and a public key used "
                    "as an HMAC secret lets anyone sign tokens"
                )
            if name not in JWT_ALGORITHMS:
                raise ValueError(f"unknown algorithm {name!r}; expected some of {sorted(JWT_ALGORITHMS)}")
        return value

    @field_validator("jwks_url")
    @classmethod
    def _safe_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        _no_placeholder(value, "your identity provider's JWKS URL")
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        loopback = parts.hostname in {"localhost", "127.0.0.1", "::1"}
        if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
            raise ValueError(
                "expected an https:// URL (http:// only to localhost): keys fetched in clear can be forged"
            )
        if not parts.hostname:
            raise ValueError("the URL has no host")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> IssuerSettings:
        if self.jwks_file is not None and self.jwks_url is not None:
            raise ValueError("set jwks_file or jwks_url, not both")
        return self


class IdentitySettings(_Section):
    """Who the caller is: verify its bearer JWT here (jwt), trust Envoy's jwt_authn (envoy), or neither.

    There is no default: a server refuses to start until the settings choose a mode, so that running
    with nobody authenticated is a decision written down (``mode: none``), never an omission."""

    mode: Literal["none", "jwt", "envoy"] | None = Field(
        None,
        description="none: no identity (every caller gets the default policy); jwt: verify the bearer "
        "token here; envoy: read the payload Envoy's jwt_authn verified from dynamic metadata. "
        "Unset: `extproc serve` refuses to start",
    )
    issuers: list[IssuerSettings] = Field(
        default_factory=list, description="trusted issuers; a token is checked only with the keys of its own"
    )
    leeway_seconds: float = Field(30.0, ge=0, le=600, description="clock skew allowed on exp, nbf and iat")
    max_token_bytes: int = Field(
        8192, ge=256, le=1024 * 1024, description="longer tokens are refused before anything is parsed"
    )
    jwks_refresh_seconds: float = Field(300.0, gt=0, description="every JWKS is refreshed this often")
    jwks_min_refresh_seconds: float = Field(
        30.0, ge=0, description="an unknown kid refreshes its issuer's JWKS at most once per this period"
    )
    jwks_timeout_seconds: float = Field(5.0, gt=0, le=120, description="time limit of one JWKS URL fetch")
    cache_entries: int = Field(
        10000, ge=0, description="verified tokens remembered (by SHA-256) until they expire; 0: no cache"
    )
    envoy_metadata_namespace: str = Field(
        "envoy.filters.http.jwt_authn", min_length=1, description="mode envoy: jwt_authn's metadata namespace"
    )
    envoy_payload_key: str = Field(
        "jwt_payload", min_length=1, description="mode envoy: jwt_authn's payload_in_metadata name"
    )

    @model_validator(mode="after")
    def _consistent(self) -> IdentitySettings:
        names = [issuer.issuer for issuer in self.issuers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"issuers listed twice: {duplicates}")
        if self.mode == "jwt":
            if not self.issuers:
                raise ValueError("mode jwt needs at least one entry in issuers")
            for index, issuer in enumerate(self.issuers):
                if issuer.jwks_file is None and issuer.jwks_url is None:
                    raise ValueError(f"issuers.{index} ({issuer.issuer}): set jwks_file or jwks_url")
        return self


class TelemetrySettings(_Section):
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/gRPC collector (Jaeger accepts OTLP): http://HOST:4317 for plaintext, "
        "https://HOST:4317 for TLS; unset: no spans or metrics are pushed, and spans cost nothing",
    )
    service_name: str = Field("extproc", min_length=1, description="the service name spans carry")
    sample_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="share of exchanges traced when Envoy sends no trace context; with one, Envoy decides",
    )
    metrics: bool = Field(
        True, description="push metrics to the OTLP endpoint too (Jaeger takes traces only: false for it)"
    )
    prometheus: bool = Field(
        True,
        description="serve the same metrics at GET /metrics on the admin port, in Prometheus' text format; "
        "they are then recorded with no OTLP endpoint too (tens of microseconds per exchange)",
    )
    metrics_interval_seconds: float = Field(30.0, gt=0, description="how often metrics are exported")
    export_delay_seconds: float = Field(
        2.0, gt=0, description="longest a finished span waits to be exported with others"
    )
    export_timeout_seconds: float = Field(10.0, gt=0, description="one export's time limit")


class AuditSettings(_Section):
    record_path: str | None = Field(
        None, description="the session record: one JSON line per exchange, hash-chained; unset: none"
    )
    sealing_key_file: str | None = Field(
        None,
        description="the auditor's X25519 public key (`extproc audit keygen`); original bodies are sealed "
        "to it, which the sidecar cannot open. Unset: originals are not recorded",
    )
    signing_key_file: str | None = Field(
        None, description="Ed25519 private key that signs checkpoints; unset: the chain has no checkpoints"
    )
    max_body_bytes: int = Field(
        256 * 1024, ge=0, description="each recorded body (masked, and original before sealing) is cut here"
    )
    checkpoint_every: int = Field(100, ge=1, description="a signed checkpoint after this many records")
    checkpoint_seconds: float = Field(60.0, gt=0, description="or after this long, whichever comes first")
    fsync: bool = Field(True, description="flush every batch of records to the disk before the next")
    queue_size: int = Field(10000, ge=1, description="records waiting to be written; beyond it they are lost")
    max_queue_bytes: int = Field(
        64 * MiB,
        ge=MiB,
        description="body bytes of the records waiting to be written; beyond it they are lost",
    )
    on_error: Literal["fail_closed", "continue"] = Field(
        "fail_closed",
        description="when the record cannot be written: refuse new requests (503 audit_unavailable) until "
        "it can, or keep serving and mark the record incomplete with a gap entry",
    )

    @model_validator(mode="after")
    def _keys_need_a_record(self) -> AuditSettings:
        if self.record_path is None and (self.sealing_key_file or self.signing_key_file):
            raise ValueError("sealing_key_file and signing_key_file need record_path")
        # One exchange keeps up to four bodies (each direction, masked and original) for its record.
        if self.max_queue_bytes < 4 * self.max_body_bytes:
            raise ValueError("max_queue_bytes must hold at least one record: 4 x max_body_bytes")
        return self


class Settings(_Section):
    """Every setting of the sidecar. See the README's configuration reference."""

    server: ServerSettings = ServerSettings()
    log: LogSettings = LogSettings()
    limits: LimitSettings = LimitSettings()
    detect: DetectSettings = DetectSettings()
    mask: MaskSettings = MaskSettings()
    policy: PolicySettings = PolicySettings()
    routes: RouteSettings = RouteSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    identity: IdentitySettings = IdentitySettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    audit: AuditSettings = AuditSettings()
    approvals: ApprovalSettings = ApprovalSettings()


def require_identity_choice(settings: Settings) -> None:
    """Raise ConfigError unless the settings choose an identity mode: what a server checks before
    serving. Other commands (scan, rules, audit) authenticate nobody and need no choice."""
    if settings.identity.mode is None:
        raise ConfigError(
            "identity.mode is not set: choose jwt (verify callers' tokens; see the README's Identity "
            "section), envoy (Envoy's jwt_authn verifies them), or none (authenticate nobody: every "
            "caller gets the default policy), e.g. `identity: {mode: none}` or EXTPROC_IDENTITY__MODE=none"
        )


def approver_token() -> str | None:
    """``$EXTPROC_APPROVER_TOKEN``, the default of ``extproc approvals --token``; None when unset or empty."""
    return os.environ.get(APPROVER_TOKEN_ENV) or None


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (or ``$EXTPROC_CONFIG``), the environment and ``overrides``.

    ``overrides`` are nested dicts by section, e.g. ``server={"grpc_address": "127.0.0.1:0"}``; they win
    over the environment, which wins over the file. Raises ConfigError naming the file and the field."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    where = "settings"
    if path is not None:
        where = str(path)
        try:
            loaded = yamlfiles.load(yamlfiles.decode(Path(path).read_bytes()))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read settings file: {exc.strerror}") from exc
        except yamlfiles.YamlProblem as exc:
            raise ConfigError(f"{exc.where(path)}: {exc.message}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the settings file must be a mapping of sections")
        data = loaded
    env_layer = _env_layer()
    merged = _deep_merge(_deep_merge(data, env_layer), overrides)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            location = [str(p) for p in err["loc"]]
            source = _source(location, path, env_layer, overrides) or where
            problems.append(f"{source}: {'.'.join(location)}: {err['msg']}")
        raise ConfigError("; ".join(problems)) from exc


def _source(
    location: list[str], path: str | Path | None, env_layer: dict[str, Any], overrides: dict[str, Any]
) -> str | None:
    """Where the value at ``location`` came from: an override, the environment variable that set it, or
    the settings file and the line of its key. None when none of them holds it (a missing field)."""
    if _holds(overrides, location):
        return "override"
    if _holds(env_layer, location):
        return "$EXTPROC_" + "__".join(part.upper() for part in location)
    if path is None:
        return None
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return str(path)
    line = None
    for part in location:
        if not isinstance(node, yaml.MappingNode):
            break
        found = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
        if found is None:
            break
        line, node = found[0].start_mark.line + 1, found[1]
    return f"{path}:{line}" if line is not None else str(path)


def _holds(layer: dict[str, Any], location: list[str]) -> bool:
    node: Any = layer
    for part in location:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _env_layer() -> dict[str, Any]:
    """``EXTPROC_SECTION__FIELD=value`` environment variables as a nested dict. A value in brackets or
    braces is a list or a mapping in YAML flow style (JSON too): ``EXTPROC_POLICY__PATHS='["/p"]'``;
    anything else is the string itself, read by each field's own type."""
    layer: dict[str, Any] = {}
    for name, value in os.environ.items():
        if not name.startswith("EXTPROC_") or name in (CONFIG_ENV, APPROVER_TOKEN_ENV):
            continue
        parts = name[len("EXTPROC_") :].lower().split("__")
        node = layer
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _env_value(name, value)
    return layer


def _env_value(name: str, value: str) -> Any:
    if not value.lstrip().startswith(("[", "{")):
        return value
    try:
        return yamlfiles.load(value)
    except yamlfiles.YamlProblem as exc:
        raise ConfigError(f"${name}: not a YAML (or JSON) list or mapping: {exc.message}") from exc
