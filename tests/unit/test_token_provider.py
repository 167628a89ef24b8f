"""TokenProvider (syncd/connectors/auth.py): when a token is renewed, and how often."""

from __future__ import annotations

import pytest

from syncd.connectors.auth import StaticToken, Token, TokenProvider
from syncd.errors import AuthError, RetriableError


class Source:
    """A token source that counts its grants; ``fail`` makes the next grant fail."""

    system, method, renewable = "hubspot", "oauth", True

    def __init__(self, clock: list[float], lifetime: float | None = 100.0) -> None:
        self.clock, self.lifetime, self.grants, self.fail = clock, lifetime, 0, False

    def fetch(self) -> Token:
        if self.fail:
            raise RetriableError("hubspot: OAuth refresh could not be sent", system="hubspot")
        self.grants += 1
        now = self.clock[0]
        return Token(f"t{self.grants}", issued_at=now,
                     expires_at=None if self.lifetime is None else now + self.lifetime)


def provider(lifetime: float | None = 100.0) -> tuple[TokenProvider, Source, list[float]]:
    clock = [1000.0]
    src = Source(clock, lifetime)
    return TokenProvider(src, clock=lambda: clock[0]), src, clock


def test_a_token_is_renewed_a_tenth_of_its_life_before_it_expires_and_not_earlier() -> None:
    p, src, clock = provider()
    first = p.token()
    clock[0] += 89
    assert p.token() is first
    clock[0] += 2  # 91 s of 100: inside the last tenth
    assert p.token().value == "t2" and src.grants == 2


def test_a_refusal_renews_once_and_later_callers_with_the_same_dead_token_get_the_new_one() -> None:
    p, src, _ = provider(lifetime=None)
    dead = p.token()
    fresh = p.renew(dead)
    assert p.renew(dead) is fresh and p.renew(dead) is fresh
    assert src.grants == 2
    assert p.renew(fresh).value == "t3"  # the new one refused too: one more login


def test_a_failed_early_renewal_keeps_the_token_while_it_is_still_alive() -> None:
    p, src, clock = provider()
    first = p.token()
    clock[0] += 95
    src.fail = True
    assert p.token() is first  # 5 s left: used, and the next call tries again
    src.fail = False
    assert p.token().value == "t2"


def test_every_grant_is_counted_by_outcome_and_a_fixed_token_asks_none() -> None:
    p, src, clock = provider()
    live = p.token()
    clock[0] += 95
    src.fail = True
    assert p.token() is live  # a renewal that could not be sent: counted, the live token still used

    def refused() -> Token:
        raise AuthError("hubspot: OAuth refresh refused: invalid_grant", system="hubspot")

    src.fetch = refused  # type: ignore[method-assign]
    with pytest.raises(AuthError):
        p.renew(live)  # the CRM refused the live token, and the re-login is refused
    assert p.grants == {"ok": 1, "refused": 1, "error": 1} and p.logins == 1

    fixed = TokenProvider(StaticToken("salesforce", "session", "s"))
    fixed.token()
    assert fixed.grants == {"ok": 0, "refused": 0, "error": 0}
