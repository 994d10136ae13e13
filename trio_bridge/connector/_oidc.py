"""The portal's OpenID Connect client: authorization code flow with PKCE, ``state`` and
``nonce``, for any standard provider (Keycloak, Authentik, GitLab, Google, Microsoft Entra).

Who does what: the HTTP to the provider (discovery, JWKS, token endpoint) is ours, on an
``httpx.AsyncClient`` under trio; the protocol's parts come from **authlib** (the authorization
request, the token request's body, PKCE's S256 challenge, random tokens) and every check of the
ID token from **joserfc** (JWS signature against the provider's JWKS, then ``iss``, ``aud``,
``exp``, ``iat``, ``nonce`` as registered claims). No token check is written by hand here.

Key rotation: the JWKS is fetched at start and again when an ID token names a key id it lacks
(at most once per ``JWKS_REFRESH`` seconds, so a forged ``kid`` cannot make us hammer the
provider).

Error handling: anything wrong with the provider's answers or the token raises
:class:`SignInFailed` with a message fit for the user's page (never a token or secret in it).
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import trio
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from trio_bridge._errors import BridgeError

log = logging.getLogger("trio_bridge.portal")

#: the JWKS is fetched again for an unknown key id at most this often (seconds)
JWKS_REFRESH = 60.0
#: how much clock skew between us and the provider the token times may show (seconds)
LEEWAY = 60
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]


class SignInFailed(BridgeError):
    """A sign-in that cannot go on; the message is shown to the user. ``status``: 502 when
    the provider could not be reached or answered nonsense, 400 when it refused or its token
    failed a check."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class OIDCClient:
    """One relying party at one provider. ``http``: the client for the provider's endpoints
    (tests may hand one in); closed by :meth:`aclose` if we made it."""

    def __init__(
        self,
        issuer: str,
        client_id: str,
        client_secret: str | None,
        redirect_uri: str,
        *,
        scopes: list[str],
        token_auth: str = "client_secret_basic",
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.client_id = client_id
        self._secret = client_secret
        self.redirect_uri = redirect_uri
        self.scopes = scopes
        self.token_auth = token_auth
        self._own_http = http is None
        self.http = http or httpx.AsyncClient(timeout=10, follow_redirects=False)
        self.meta: dict[str, Any] | None = None
        self.keys: KeySet | None = None
        self._keys_fetched = -float("inf")
        #: the JWKS is fetched again for an unknown key id at most this often
        self.jwks_refresh = JWKS_REFRESH

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()
        else:
            await trio.lowlevel.checkpoint()

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            r = await self.http.get(url, headers={"accept": "application/json"})
            r.raise_for_status()
            doc = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise SignInFailed(f"the identity provider's {what} could not be read", 502) from exc
        if not isinstance(doc, dict):
            raise SignInFailed(f"the identity provider's {what} is not a JSON object", 502)
        return doc

    async def discover(self) -> dict[str, Any]:
        """The provider's discovery document (fetched once; its issuer must be ours)."""
        if self.meta is None:
            doc = await self._get_json(
                self.issuer + "/.well-known/openid-configuration", "discovery document"
            )
            if str(doc.get("issuer", "")).rstrip("/") != self.issuer:
                raise SignInFailed(
                    "the identity provider names another issuer than configured", 502
                )
            for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(doc.get(field), str):
                    raise SignInFailed(f"the identity provider's discovery lacks {field}", 502)
            self.meta = doc
        return self.meta  # noqa: ASYNC910  fetched before: nothing to wait for

    async def _fetch_keys(self) -> KeySet:
        meta = await self.discover()
        doc = await self._get_json(meta["jwks_uri"], "signing keys (JWKS)")
        try:
            keys = KeySet.import_key_set(doc)  # type: ignore[arg-type]
        except (JoseError, ValueError, KeyError, TypeError) as exc:
            raise SignInFailed(
                "the identity provider's signing keys (JWKS) are unusable", 502
            ) from exc
        self.keys, self._keys_fetched = keys, trio.current_time()
        return keys

    async def authorization_url(self) -> tuple[str, str, str, str]:
        """A new sign-in: (URL to send the browser to, state, nonce, PKCE code verifier)."""
        meta = await self.discover()
        state, nonce, verifier = generate_token(32), generate_token(32), generate_token(64)
        url = prepare_grant_uri(
            meta["authorization_endpoint"],
            self.client_id,
            "code",
            redirect_uri=self.redirect_uri,
            scope=" ".join(self.scopes),
            state=state,
            nonce=nonce,
            code_challenge=create_s256_code_challenge(verifier),
            code_challenge_method="S256",
        )
        return str(url), state, nonce, verifier

    async def exchange(self, code: str, nonce: str, verifier: str) -> dict[str, Any]:
        """Trade the code for tokens at the token endpoint; the verified ID token's claims."""
        meta = await self.discover()
        params: dict[str, Any] = {"code": code, "code_verifier": verifier}
        auth: httpx.Auth | None = None
        if self._secret is not None and self.token_auth == "client_secret_basic":
            auth = httpx.BasicAuth(_form(self.client_id), _form(self._secret))
        else:
            params["client_id"] = self.client_id
            if self._secret is not None:
                params["client_secret"] = self._secret
        body = prepare_token_request("authorization_code", redirect_uri=self.redirect_uri, **params)
        try:
            r = await self.http.post(
                meta["token_endpoint"],
                content=body.encode(),
                auth=auth or httpx.USE_CLIENT_DEFAULT,
                headers={
                    "content-type": "application/x-www-form-urlencoded",
                    "accept": "application/json",
                },
            )
            doc = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise SignInFailed(
                "the identity provider's token endpoint did not answer", 502
            ) from exc
        if r.status_code != 200 or not isinstance(doc, dict):
            error = doc.get("error", r.status_code) if isinstance(doc, dict) else r.status_code
            raise SignInFailed(f"the identity provider refused the sign-in ({error})")
        id_token = doc.get("id_token")
        if not isinstance(id_token, str):
            raise SignInFailed("the identity provider sent no ID token")
        claims = await self.verify_id_token(id_token, nonce)
        access_token = doc.get("access_token")
        if (
            "email" not in claims
            and meta.get("userinfo_endpoint")
            and isinstance(access_token, str)
        ):
            claims = await self._userinfo(meta["userinfo_endpoint"], access_token, claims)
        return claims

    async def _userinfo(
        self, url: str, access_token: str, claims: dict[str, Any]
    ) -> dict[str, Any]:
        """The ID token's claims with the userinfo endpoint's (providers that keep the email
        and groups out of the ID token); its ``sub`` must be the ID token's (OIDC 5.3.2)."""
        try:
            r = await self.http.get(
                url,
                headers={"authorization": f"Bearer {access_token}", "accept": "application/json"},
            )
            r.raise_for_status()
            info = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise SignInFailed("the identity provider's userinfo could not be read", 502) from exc
        if not isinstance(info, dict) or info.get("sub") != claims["sub"]:
            raise SignInFailed("the identity provider's userinfo is about another user")
        return {**info, **claims}

    async def verify_id_token(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The claims of ``id_token`` once its signature (the provider's JWKS), issuer,
        audience, expiry, issue time and nonce are verified by joserfc; SignInFailed if not."""
        try:
            kid = jws.extract_compact(id_token.encode()).protected.get("kid")
        except (JoseError, ValueError) as exc:
            raise SignInFailed("the ID token is malformed") from exc
        keys = self.keys or await self._fetch_keys()
        unknown = kid is not None and not any(k.kid == kid for k in keys.keys)
        if unknown and trio.current_time() - self._keys_fetched >= self.jwks_refresh:
            keys = await self._fetch_keys()  # the provider rotated its keys
        try:
            token = jwt.decode(id_token, keys, algorithms=ALGORITHMS)
        except (JoseError, ValueError) as exc:
            log.warning("portal: an ID token failed its signature check: %s", type(exc).__name__)
            raise SignInFailed("the ID token's signature is not the identity provider's") from exc
        registry = jwt.JWTClaimsRegistry(
            leeway=LEEWAY,
            iss={"essential": True, "values": [self.issuer, self.issuer + "/"]},
            aud={"essential": True, "value": self.client_id},
            sub={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
            nonce={"essential": True, "value": nonce},
        )
        try:
            registry.validate(token.claims)
        except JoseError as exc:
            log.warning("portal: an ID token was refused: %s", type(exc).__name__)
            raise SignInFailed(f"the ID token was refused: {exc.description or exc.error}") from exc
        claims = dict(token.claims)
        aud = claims.get("aud")
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.client_id:
            raise SignInFailed("the ID token was refused (azp is not this portal)")
        return claims  # noqa: ASYNC910  the keys were in hand: checking is CPU only


def _form(value: str) -> str:
    """RFC 6749 2.3.1: client id and secret are form-encoded before HTTP Basic."""
    from urllib.parse import quote_plus

    return quote_plus(value)
