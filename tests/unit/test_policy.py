from __future__ import annotations

import pytest

from serve.api.policy import PromptPolicy, RetryPolicy, api_key_ok
from serve.errors import ContentPolicyError


def test_api_keys():
    assert api_key_ok(None, ())  # no keys configured: open
    assert api_key_ok("Bearer k2", ("k1", "k2"))
    assert not api_key_ok("Bearer k3", ("k1", "k2"))
    assert not api_key_ok(None, ("k1",))
    assert not api_key_ok("k1", ("k1",))  # scheme required
    assert not api_key_ok("Basic k1", ("k1",))
    assert not api_key_ok("Bearer ", ("k1",))


def test_prompt_policy_blocklist_patterns_and_checker(monkeypatch):
    policy = PromptPolicy(blocklist=("gore", "bad thing"), patterns=(r"\bkill\w*",))
    policy.check("a gorgeous sunset")  # word boundaries: no false positive
    policy.check("calm lake", negative_prompt="gore")  # negative prompts steer away: allowed
    for prompt in ("GORE everywhere", "a Bad Thing here", "killing time"):
        with pytest.raises(ContentPolicyError) as err:
            policy.check(prompt)
        assert err.value.field == "prompt" and err.value.code == "content_policy_violation"
        assert err.value.status_code == 400

    import types

    mod = types.ModuleType("fake_checker")
    mod.check = lambda prompt: "looks like a person's name" if "alice" in prompt else None
    monkeypatch.setitem(__import__("sys").modules, "fake_checker", mod)
    hooked = PromptPolicy(checker="fake_checker:check")
    hooked.check("a cat")
    with pytest.raises(ContentPolicyError, match="person's name"):
        hooked.check("alice in a garden")


def test_retry_policy_backoff_and_deadline():
    policy = RetryPolicy(max_attempts=4, base_delay_s=0.2, max_delay_s=0.5)
    assert policy.delay(1, now=0, deadline=100) == pytest.approx(0.2)
    assert policy.delay(2, now=0, deadline=100) == pytest.approx(0.4)
    assert policy.delay(3, now=0, deadline=100) == pytest.approx(0.5)  # capped
    assert policy.delay(4, now=0, deadline=100) is None  # out of attempts
    assert policy.delay(1, now=99.9, deadline=100) is None  # would pass the deadline
