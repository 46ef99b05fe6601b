"""The LiteLLM callback's decisions: who the caller is, by what LiteLLM verified, and what to do with the call."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.gateway.board import Decision
from pipeline.gateway.litellm_decisions import Caller, Refusal, attribution_of, obey

ROOT = Path(__file__).resolve().parents[2]
ADS = Caller(key_alias="ads-key", team_alias="ads", team_id="team-ads", metadata={"env": "prod"},
             team_metadata={"env": "dev", "use_case": "copy", "cost_center": "cc-7"})


def test_attribution_is_the_key_its_team_and_their_metadata_the_key_first() -> None:
    assert attribution_of(ADS) == {"key": "ads-key", "team": "ads", "env": "prod", "use_case": "copy",
                                   "cost_center": "cc-7"}


def test_tags_name_dimensions_and_metadata_beats_tags() -> None:
    caller = Caller(key_alias="k", metadata={"tags": ["use_case:faq", "env:staging", "beta", "owner:x"],
                                             "env": "prod"})
    assert attribution_of(caller) == {"key": "k", "use_case": "faq", "env": "prod"}


def test_a_team_without_alias_is_its_id_and_a_bare_key_names_nothing() -> None:
    assert attribution_of(Caller(team_id="team-9")) == {"team": "team-9"}
    assert attribution_of(Caller()) == {}


def test_block_refuses_with_429_the_reason_and_when_to_retry() -> None:
    decision = Decision("block", "gpt-4o", "manual|team=ads", "runaway")
    assert obey(decision, ADS, expires_s=1_000.2, now_s=990.0) == Refusal(429, "runaway", "manual|team=ads", 11)
    assert obey(decision, ADS, expires_s=None, now_s=990.0) == Refusal(429, "runaway", "manual|team=ads", None)
    unexplained = obey(decision._replace(reason=""), ADS, None, 0)
    assert isinstance(unexplained, Refusal) and unexplained.message == "blocked by spendstream"


def _approved(where: str, value: object) -> Caller:
    """A caller whose key (`metadata`) or team (`team_metadata`) carries this `spendstream_approved`."""
    flag = {"spendstream_approved": value}
    return Caller(metadata=flag) if where == "metadata" else Caller(team_metadata=flag)


@pytest.mark.parametrize("where", ["metadata", "team_metadata"])
def test_approval_required_refuses_with_403_unless_the_key_or_its_team_is_approved(where: str) -> None:
    decision = Decision("approval_required", "gpt-4o", "manual|team=ads", "needs sign-off")
    refusal = Refusal(403, "needs sign-off", "manual|team=ads")
    assert obey(decision, _approved(where, True), None, 0) == "gpt-4o"
    assert obey(decision, _approved(where, "yes"), None, 0) == refusal  # only a real true
    assert obey(decision, ADS, None, 0) == refusal


def test_downgrade_calls_the_cheaper_model_and_allow_the_requested_one() -> None:
    assert obey(Decision("downgrade", "gpt-4o-mini", "b", "too dear"), ADS, None, 0) == "gpt-4o-mini"
    assert obey(Decision("allow", "gpt-4o"), ADS, None, 0) == "gpt-4o"


def test_the_readme_shows_the_litellm_config_the_tests_run() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### LiteLLM"):]
    start = section.index("```yaml\n") + len("```yaml\n")
    assert section[start:section.index("```", start)] in (ROOT / "deploy" / "litellm" / "config.yaml").read_text()
