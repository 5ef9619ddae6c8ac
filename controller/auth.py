"""Client tokens (pfcon's JWT scheme, made strict) and agent tokens.

Client tokens are what CUBE and python-pfconclient use: HS256 JWTs signed with
``SECRET_KEY`` carrying ``pfcon_user`` and ``exp`` (issue time + 2 days, in UTC).
Unlike pfcon, ``exp`` is required, ``pfcon_user`` must name the configured user and
``Bearer <token> <junk>`` is refused.  The 401 messages are pfcon's.

Agent tokens are signed with a key derived from ``SECRET_KEY`` (``Config.agent_secret``)
and name one agent (``sub``); each has a ``jti`` the store can revoke.  A client
token can never pass as an agent token, nor the reverse: the keys and the required
claims differ.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import jwt

from controller.config import Config
from controller.errors import Unauthorized

TOKEN_LIFETIME = dt.timedelta(days=2)
_ALGORITHMS = ["HS256"]


def issue_client_token(config: Config) -> str:
    exp = dt.datetime.now(dt.UTC) + TOKEN_LIFETIME
    return jwt.encode({"pfcon_user": config.pfcon_user, "exp": exp}, config.secret_key,
                      algorithm="HS256")


class ClientTokenVerifier:
    """Checks ``Authorization`` headers; remembers recently verified tokens so the
    status path (polled every few seconds per job) does not redo the HMAC."""

    def __init__(self, config: Config, cache_size: int = 4096) -> None:
        self._config = config
        self._cache: OrderedDict[str, float] = OrderedDict()
        self._cache_size = cache_size

    def check_header(self, header: str | None) -> None:
        """Raise ``Unauthorized`` with pfcon's message unless the header carries a
        valid token."""
        if header is None:
            raise Unauthorized("Missing authorization header.")
        parts = header.split(" ")
        if len(parts) != 2 or parts[0] != "Bearer":
            raise Unauthorized("Invalid authorization header.")
        self.check_token(parts[1])

    def check_token(self, token: str) -> None:
        exp = self._cache.get(token)
        if exp is not None:
            if exp > time.time():
                self._cache.move_to_end(token)
                return
            del self._cache[token]
            raise Unauthorized("Expired authorization token.")
        if not token or not token.isascii():  # a JWT is ASCII; PyJWT fails on surrogates
            raise Unauthorized("Invalid authorization token.")
        try:
            claims = jwt.decode(token, self._config.secret_key, algorithms=_ALGORITHMS,
                                options={"require": ["exp", "pfcon_user"]})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("Expired authorization token.") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("Invalid authorization token.") from None
        if claims.get("pfcon_user") != self._config.pfcon_user:
            raise Unauthorized("Invalid authorization token.")
        self._cache[token] = float(claims["exp"])
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def issue_agent_token(config: Config, name: str,
                      ttl_seconds: int | None = None) -> tuple[str, str]:
    """A new token for agent ``name`` (expiring after ``ttl_seconds`` when given);
    returns (token, jti)."""
    jti = uuid.uuid4().hex
    now = int(time.time())
    claims: dict[str, object] = {"sub": name, "typ": "pfleet-agent", "jti": jti, "iat": now}
    if ttl_seconds is not None:
        claims["exp"] = now + ttl_seconds
    token = jwt.encode(claims, config.agent_secret, algorithm="HS256")
    return token, jti


@dataclass(frozen=True)
class AgentClaims:
    name: str
    jti: str
    expires_at: float | None  # epoch seconds; None: the token never expires


def decode_agent_token(config: Config, token: str) -> AgentClaims:
    """The claims of a well-signed, unexpired agent token; raise ``Unauthorized``.

    Whether the jti was revoked is the store's business (the caller checks)."""
    try:
        claims = jwt.decode(token, config.agent_secret, algorithms=_ALGORITHMS,
                            options={"require": ["sub", "jti", "typ"]})
    except jwt.ExpiredSignatureError:
        raise Unauthorized("expired agent token") from None
    except jwt.InvalidTokenError:
        raise Unauthorized("invalid agent token") from None
    if claims.get("typ") != "pfleet-agent":
        raise Unauthorized("invalid agent token")
    exp = claims.get("exp")
    return AgentClaims(str(claims["sub"]), str(claims["jti"]),
                       float(exp) if exp is not None else None)
