"""Mode envoy: the caller's identity from the payload Envoy's jwt_authn filter already verified.

Envoy checks the signature, ``iss``, ``aud``, ``exp`` and ``nbf`` (with its own ``clock_skew_seconds``);
this module only turns the verified payload into a Principal. It is safe only when every request that
reaches ext_proc went through jwt_authn with a requirement that rejects missing and invalid tokens
(not ``allow_missing`` or ``allow_missing_or_failed``), so the payload cannot come from anyone else.

The Envoy configuration it needs, beside the ext_proc filter and before it in ``http_filters``::

    - name: envoy.filters.http.jwt_authn
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
        providers:
          idp:
            issuer: https://idp.example.com
            audiences: [llm-gateway]
            remote_jwks: {http_uri: {uri: https://idp.example.com/jwks, cluster: idp, timeout: 5s}}
            payload_in_metadata: jwt_payload          # = identity.envoy_payload_key
        rules:
        - match: {prefix: /}
          requires: {provider_name: idp}

and on the ext_proc filter, so Envoy sends that namespace along with the request headers::

    metadata_options:
      forwarding_namespaces:
        untyped: [envoy.filters.http.jwt_authn]     # = identity.envoy_metadata_namespace

jwt_authn then writes the payload as a ``google.protobuf.Struct`` under the key ``payload_in_metadata``
names, in the namespace ``envoy.filters.http.jwt_authn``::

    envoy.filters.http.jwt_authn:
      jwt_payload: {iss: https://idp.example.com, sub: alice, aud: llm-gateway, exp: 1501281058, ...}

A Struct has only doubles for numbers, so ``exp`` arrives as a float. With
``normalize_payload_in_metadata.space_delimited_claims`` a space-separated claim (``scope``) arrives as
a list, which the groups claim accepts.
"""

from __future__ import annotations

from collections.abc import Mapping

from extproc.errors import AuthError
from extproc.identity.principal import Principal, principal_from_claims
from extproc.settings import IdentitySettings


def principal_from_metadata(metadata: Mapping[str, object], settings: IdentitySettings) -> Principal:
    """The Principal of the payload jwt_authn left in ``metadata`` (namespace -> fields, as decoded from
    the ProcessingRequest's ``metadata_context.filter_metadata``).

    When issuers are listed, the payload's ``iss`` must be one of them and that issuer's groups claim
    and claims apply; with none listed, any issuer Envoy accepted is taken, groups read from ``groups``.
    No payload at all is ``jwt_missing``: Envoy did not verify a token for this request."""
    namespace = metadata.get(settings.envoy_metadata_namespace)
    payload = namespace.get(settings.envoy_payload_key) if isinstance(namespace, Mapping) else None
    if not isinstance(payload, Mapping):
        raise AuthError(
            "no verified token: Envoy's jwt_authn left no payload for this request", code="jwt_missing"
        )
    issuer = None
    if settings.issuers:
        iss = payload.get("iss")
        issuer = next((item for item in settings.issuers if item.issuer == iss), None)
        if issuer is None:
            raise AuthError("the token's issuer is not one this service trusts", code="jwt_issuer_unknown")
    return principal_from_claims(payload, issuer, require_exp=False)
