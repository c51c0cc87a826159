"""The exception tree. Every error a client can see has a stable code; ``HTTP_STATUS`` is the one table
that maps codes to HTTP statuses."""

from __future__ import annotations

from typing import Final

HTTP_STATUS: Final[dict[str, int]] = {
    "invalid_json": 400,
    "not_found": 404,  # a path that is not one of the model server's forwarded ones (routes.model)
    "invalid_body": 400,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "unsupported_content_encoding": 415,
    "invalid_content_encoding": 400,
    "model_not_allowed": 403,
    "media_not_allowed": 403,  # images, audio, video or files the policy does not let through unscanned
    "policy_blocked": 403,
    "approval_required": 403,
    # approvals (extproc/approvals): a retry with x-approval-id, or an approver's step, the rules refuse
    "approval_pending": 403,
    "approval_denied": 403,
    "approval_expired": 403,
    "approval_used": 403,
    "approval_mismatch": 403,
    "approval_not_found": 404,
    "approval_needs_identity": 403,
    "approval_unavailable": 503,  # the approval store cannot be reached: approval-needing requests only
    "approval_self": 403,
    "approval_not_approver": 403,
    "approval_already_voted": 409,
    "approval_closed": 409,
    "approval_cross_site": 403,  # a vote to the approval page's API that its own page would not send
    "prompt_blocked": 403,
    "unmasked_not_allowed": 403,
    "prompt_too_long": 400,
    "prompt_unscannable": 400,  # a prompt as token ids or embeddings (extproc/mask/tokens.py)
    "max_tokens_too_large": 400,
    "header_not_maskable": 403,  # a request header the policy masks cannot be rewritten (host, content-type)
    "headers_too_large": 431,
    "upstream_unscannable": 502,
    "upstream_too_large": 502,
    "upstream_timeout": 504,
    "upstream_header_not_maskable": 502,  # the same in the answer's headers
    "upstream_credential_unavailable": 503,
    "audit_unavailable": 503,  # the session record cannot be written and audit.on_error is fail_closed
    # identity: the caller's bearer token (extproc/identity); every one is a 401
    "jwt_missing": 401,
    "jwt_malformed": 401,
    "jwt_too_large": 401,
    "jwt_alg_not_allowed": 401,
    "jwt_key_unknown": 401,
    "jwt_signature_invalid": 401,
    "jwt_expired": 401,
    "jwt_not_yet_valid": 401,
    "jwt_issuer_unknown": 401,
    "jwt_claim_invalid": 401,
    "internal_error": 500,
}


class ExtProcError(Exception):
    """Base of every error the sidecar raises on purpose."""

    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if self.code not in HTTP_STATUS:
            raise ValueError(f"error code {self.code!r} has no HTTP status in errors.HTTP_STATUS")
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


class ClientError(ExtProcError):
    """The request itself is unacceptable; the client gets a JSON error and the model sees nothing."""

    code = "invalid_body"


class UpstreamError(ExtProcError):
    """The model server's answer cannot be scanned or is too large; the client gets a JSON error."""

    code = "upstream_unscannable"


class ProtocolError(ExtProcError):
    """Envoy sent something the exchange cannot accept (out of order, unknown, unsupported mode).

    The exchange never answers these with a silent allow: the gRPC stream is aborted, and Envoy, configured
    with ``failure_mode_allow: false``, fails the HTTP request."""

    code = "internal_error"


class AuthError(ExtProcError):
    """The caller's token is missing or does not verify: the client gets a 401 and the model sees nothing.

    The message tells the caller what was wrong and never contains the token or any part of it (not even
    its kid or issuer): messages reach clients and logs, and a token in a log is a credential in a log."""

    code = "jwt_malformed"


class ConfigError(Exception):
    """Settings or a configuration file are invalid; raised at start-up, never on the request path."""
