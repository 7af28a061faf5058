"""The containment breaker, per rule: a misfiring rule is suspended, the others go on."""

from ebpfmon.config import EnforceSettings
from ebpfmon.containment.breaker import Breaker

S = 1_000_000_000


def breaker(agents_on_node=10, **settings):
    count = {"n": agents_on_node}
    return Breaker(EnforceSettings(**{"breaker_agents": 3, "breaker_fraction": 0.5, "breaker_seconds": 60,
                                      "breaker_resume_seconds": 900, **settings}), lambda: count["n"]), count


def test_a_rule_past_its_threshold_is_suspended_and_the_others_are_not():
    b, _ = breaker(agents_on_node=4)  # threshold max(3, 0.5 x 4) = 3
    assert [b.admit("misfire", f"a{i}", i * S) for i in range(3)] == [None] * 3
    suspension = b.admit("misfire", "a3", 3 * S)
    assert suspension is not None and suspension.since_ns == 3 * S
    assert suspension.agents == ["a0", "a1", "a2"]
    assert suspension.until_ns == 903 * S
    assert b.admit("misfire", "a4", 4 * S) is suspension  # stays suspended, the same page
    assert all(b.admit("tunnel", f"a{i}", 5 * S) is None for i in range(3))  # another rule still acts
    assert list(b.active(10 * S)) == ["misfire"]


def test_the_same_agent_again_is_not_counted_twice():
    b, _ = breaker(agents_on_node=0)
    for _ in range(10):
        assert b.admit("r", "a0", S) is None
    assert b.admit("r", "a1", S) is None and b.admit("r", "a2", S) is None


def test_the_threshold_grows_with_the_agents_on_the_node():
    b, _ = breaker(agents_on_node=200)  # max(3, 100)
    assert all(b.admit("r", f"a{i}", S) is None for i in range(100))
    assert b.admit("r", "a100", S) is not None


def test_actions_older_than_the_window_fall_out():
    b, _ = breaker(agents_on_node=0)
    for i in range(3):
        assert b.admit("r", f"a{i}", 0) is None
    assert b.admit("r", "a3", 61 * S) is None  # the first three are out of the 60 s window


def test_a_suspension_ends_by_itself_or_by_resume():
    b, _ = breaker(agents_on_node=0, breaker_resume_seconds=10)
    for i in range(4):
        b.admit("r", f"a{i}", 0)
    assert b.admit("r", "x", 5 * S) is not None
    assert b.admit("r", "x", 11 * S) is None and b.active(11 * S) == {}
    for i in range(4):
        b.admit("q", f"a{i}", 0)
    assert b.resume("q") and not b.resume("q")
    assert b.admit("q", "y", S) is None
