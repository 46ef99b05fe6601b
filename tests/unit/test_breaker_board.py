"""What gateways do with breaker commands (BreakerBoard.decide), and the policy reload that keeps the last good one."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from pipeline.gateway.board import BreakerBoard
from pipeline.gateway.kill_switch import reset_commands, trip_command
from pipeline.guardrails.policy_file import PolicyFile
from schemas.breaker import BreakerAction, BreakerCommand
from schemas.config import load_config
from schemas.policy import Scope

NOW = 1_800_000_000.0
PROD_SEARCH = {"team": "search", "env": "prod", "key": "k1", "use_case": "rag"}


def trip(scope: str, action: BreakerAction = "block", **changes: object) -> BreakerCommand:
    command = trip_command(Scope.parse(scope), action, f"{action} {scope}", ttl_s=None,
                           downgrade={"gpt-4o": "gpt-4o-mini"}, now_s=NOW)
    return msgspec.structs.replace(command, **changes)


def test_a_block_applies_to_its_scope_only() -> None:
    board = BreakerBoard()
    board.apply(trip("team=search"))
    assert board.decide(PROD_SEARCH, "gpt-4o", NOW).verdict == "block"
    assert board.decide({**PROD_SEARCH, "team": "ads"}, "gpt-4o", NOW).verdict == "allow"
    board.apply(trip("key=k1,env=prod"))
    assert board.decide({"key": "k1", "env": "dev"}, "gpt-4o", NOW).verdict == "allow"
    assert board.decide({"key": "k1", "env": "prod"}, "gpt-4o", NOW).breaker_id == "manual|env=prod,key=k1"


def test_global_matches_everything_and_reset_lifts_it() -> None:
    board = BreakerBoard()
    board.apply(trip("global", "approved_only"))
    assert board.decide({}, "m", NOW).verdict == "approval_required"
    for command in reset_commands(Scope(), "over", NOW + 1):
        board.apply(command)
    assert board.decide({}, "m", NOW).verdict == "allow" and board.in_force() == []


def test_reset_lifts_the_breaker_of_every_budget_of_the_scope() -> None:
    board = BreakerBoard()
    for period in ("monthly", "daily"):
        board.apply(trip("team=search", source="budget", breaker_id=f"budget|team=search|{period}"))
    board.apply(trip("team=ads", source="budget", breaker_id="budget|team=ads|daily"))
    for command in reset_commands(Scope.parse("team=search"), "over", NOW + 1):
        board.apply(command)
    assert board.decide(PROD_SEARCH, "m", NOW).verdict == "allow"
    assert [c.breaker_id for c in board.in_force()] == ["budget|team=ads|daily"]


def test_downgrade_rewrites_the_model_when_a_cheaper_one_is_mapped() -> None:
    board = BreakerBoard()
    board.apply(trip("team=search", "downgrade"))
    decision = board.decide(PROD_SEARCH, "gpt-4o", NOW)
    assert (decision.verdict, decision.model) == ("downgrade", "gpt-4o-mini")
    assert board.decide(PROD_SEARCH, "claude-haiku-4-5", NOW).verdict == "allow"


def test_the_strictest_breaker_wins() -> None:
    board = BreakerBoard()
    board.apply(trip("team=search", "downgrade"))
    board.apply(trip("key=k1", "approved_only"))
    assert board.decide(PROD_SEARCH, "gpt-4o", NOW).verdict == "approval_required"
    board.apply(trip("global", "block"))
    assert board.decide(PROD_SEARCH, "gpt-4o", NOW).verdict == "block"


def test_budget_breakers_act_by_environment() -> None:
    board = BreakerBoard()
    board.apply(trip("team=search", env_actions={"prod": "approved_only", "non_prod": "block"}))
    assert board.decide(PROD_SEARCH, "m", NOW).verdict == "approval_required"
    assert board.decide({**PROD_SEARCH, "env": "staging"}, "m", NOW).verdict == "block"
    board.apply(trip("team=search", env_actions={"prod": "none", "non_prod": "block"}))
    assert board.decide(PROD_SEARCH, "m", NOW).verdict == "allow"


def test_expired_commands_fail_open() -> None:
    board = BreakerBoard()
    board.apply(trip("team=search", expires_at="2027-01-15T09:00:00Z"))
    assert board.decide(PROD_SEARCH, "m", NOW).verdict == "block"  # NOW is January 2027
    assert board.decide(PROD_SEARCH, "m", NOW + 86_400).verdict == "allow"


def test_half_open_lets_its_probe_share_through() -> None:
    board = BreakerBoard()
    board.apply(trip("team=search", state="half_open", probe_ratio=0.1))
    verdicts = [board.decide(PROD_SEARCH, "m", NOW).verdict for _ in range(100)]
    assert verdicts.count("allow") == 10 and verdicts.count("block") == 90


def test_a_bad_reload_keeps_the_policy_in_force(tmp_path: Path) -> None:
    path = tmp_path / "spendstream.yaml"
    path.write_text("budgets:\n  - {scope: {team: a}, amount: 100}\n")
    policy = PolicyFile(path, load_config(path).policy)
    assert policy.check() is False  # unchanged file: nothing to do
    path.write_text("budgets:\n  - {scope: {team: a}, amount: -5}\n")
    assert policy.check() is False
    assert policy.policy.budgets[0].amount == 100
    path.write_text("budgets:\n  - {scope: {team: a}, amount: 250}\n")
    os.utime(path, ns=(1, 1))  # a changed stamp even within the file system's time resolution
    assert policy.check() is True and policy.policy.budgets[0].amount == 250
    policy.request_reload()  # SIGHUP: reload even though the file looks the same
    assert policy.check() is False and policy.policy.budgets[0].amount == 250


def test_case_and_blanks_do_not_escape_a_breaker() -> None:
    board = BreakerBoard()
    board.apply(trip("team=Search", "approved_only", env_actions={"prod": "block"}, prod_envs=("prod",)))
    for team in ("search", "SEARCH", " Search "):
        assert board.decide({**PROD_SEARCH, "team": team, "env": "PROD"}, "gpt-4o", NOW).verdict == "block"
    assert board.decide({**PROD_SEARCH, "team": "search2"}, "gpt-4o", NOW).verdict == "allow"


def test_the_board_says_when_a_breaker_lifts_by_itself() -> None:
    board = BreakerBoard()
    board.apply(trip("team=search", expires_at="2027-01-15T08:10:00+00:00"))
    board.apply(trip("team=ads"))
    assert board.expires_s("manual|team=search") == NOW + 600
    assert board.expires_s("manual|team=ads") is None  # until reset
    assert board.expires_s("manual|team=nobody") is None


def test_a_reload_keeps_the_environments_settings(tmp_path: Path) -> None:
    from schemas.config_env import env_overrides  # noqa: PLC0415

    path = tmp_path / "spendstream.yaml"
    path.write_text("breaker:\n  cool_down: 5m\nbudgets:\n  - {scope: {team: a}, amount: 100}\n")
    overrides = env_overrides({"SPENDSTREAM_BREAKER_COOL_DOWN": "1m"})
    policy = PolicyFile(path, load_config(path, overrides).policy, overrides)
    assert policy.policy.breaker.cool_down_s == 60
    path.write_text("breaker:\n  cool_down: 5m\nbudgets:\n  - {scope: {team: a}, amount: 250}\n")
    os.utime(path, ns=(1, 1))
    assert policy.check() is True and policy.policy.budgets[0].amount == 250
    assert policy.policy.breaker.cool_down_s == 60, "SPENDSTREAM_BREAKER_COOL_DOWN still wins over the file"


def test_a_reset_lifts_a_trip_whatever_the_spelling_of_either() -> None:
    board = BreakerBoard()
    board.apply(tripped := trip("team=Search "))
    assert tripped.breaker_id == "manual|team=search" and tripped.scope_attributes == {"team": "search"}
    # stage 2 names its breakers by the calls' own spelling
    board.apply(rate := msgspec.structs.replace(trip("team=search"), source="rate", breaker_id="rate|team=SEARCH",
                                                scope="team=SEARCH"))
    board.apply(other := trip("team=searchers", source="rate", breaker_id="rate|team=searchers"))
    for command in reset_commands(Scope.parse("team=search"), "over", NOW + 1, [tripped, rate, other]):
        board.apply(command)
    assert board.decide(PROD_SEARCH, "m", NOW).verdict == "allow"
    assert [c.breaker_id for c in board.in_force()] == ["rate|team=searchers"]
