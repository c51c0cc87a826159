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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from extproc.errors import ConfigError

CONFIG_ENV = "EXTPROC_CONFIG"
MiB = 1024 * 1024
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


class PolicySettings(_Section):
    paths: list[str] = Field(
        default_factory=lambda: [str(REPO_POLICIES)],
        description="policy files, or folders of *.yaml policy files (default: the repo's rules/policies/)",
    )


class Settings(_Section):
    """Every setting of the sidecar. See the README's configuration reference."""

    server: ServerSettings = ServerSettings()
    log: LogSettings = LogSettings()
    limits: LimitSettings = LimitSettings()
    detect: DetectSettings = DetectSettings()
    mask: MaskSettings = MaskSettings()
    policy: PolicySettings = PolicySettings()


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
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read settings file: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
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
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"{where}: {problems}") from exc


def _env_layer() -> dict[str, Any]:
    """``EXTPROC_SECTION__FIELD=value`` environment variables as a nested dict."""
    layer: dict[str, Any] = {}
    for name, value in os.environ.items():
        if not name.startswith("EXTPROC_") or name == CONFIG_ENV:
            continue
        parts = name[len("EXTPROC_") :].lower().split("__")
        node = layer
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return layer
