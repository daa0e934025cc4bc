"""The deployments file: what it accepts, and how each mistake is named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.core.deployments.spec import DeploymentsFile, DeploymentsFileError, parse
from gateway.core.recipes import RecipeCatalog

ROOT = Path(__file__).resolve().parents[4]
RECIPES = RecipeCatalog.load([ROOT / "recipes", ROOT / "tests" / "recipes"])

GOOD = """
[deployments.web]
recipe_name = "testing/openai-stub"
replicas = 2
tenant = "team-a"
[deployments.web.config.environment]
VLLM_SERVED_MODEL_NAME = "web"
STUB_TOKENS = 8
[deployments.web.config.resources]
time_limit = 30

[deployments.shared]
recipe_name = "testing/openai-stub"
"""


def error_of(text: str, name: str) -> str:
    declared = parse(text, "d.toml", RECIPES)
    assert name not in declared.deployments
    return declared.errors[name]


def test_a_good_file_gives_each_deployment_its_jobs_spec() -> None:
    declared = parse(GOOD, "d.toml", RECIPES)
    assert not declared.errors and declared.names == {"web", "shared"}
    web = declared.deployments["web"]
    assert (web.replicas, web.spec.tenant, web.shared) == (2, "team-a", False)
    assert web.environment["STUB_TOKENS"] == "8"  # a TOML number, as the API takes it
    assert web.resources.time_limit_minutes == 30
    assert web.where == "d.toml:2"
    shared = declared.deployments["shared"]
    assert shared.shared and shared.replicas == 1


def test_the_generation_changes_with_what_the_jobs_get_and_nothing_else() -> None:
    web = parse(GOOD, "d.toml", RECIPES).deployments["web"]
    again = parse("\n\n" + GOOD, "other.toml", RECIPES).deployments["web"]
    assert again.generation == web.generation  # another place, the same jobs
    more = parse(GOOD.replace("replicas = 2", "replicas = 3"), "d.toml", RECIPES)
    assert more.deployments["web"].generation == web.generation  # a count is no new version
    changed = parse(GOOD.replace("STUB_TOKENS = 8", "STUB_TOKENS = 9"), "d.toml", RECIPES)
    assert changed.deployments["web"].generation != web.generation


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ('"testing/openai-stub"\nreplicas', '"testing/nope"\nreplicas'),
            "d.toml:2: deployments.web.recipe_name: ",
        ),
        (
            ("STUB_TOKENS = 8", "STUB_TOKENS = 0"),
            "d.toml:2: deployments.web.config.environment.STUB_TOKENS: ",
        ),
        (
            ("STUB_TOKENS = 8", "NOPE = 1"),
            "deployments.web.config.environment.NOPE: not a variable",
        ),
        (("replicas = 2", "replicas = 65"), "deployments.web.replicas: Expected `int` <= 64"),
        (("time_limit = 30", "time_limit = 0"), "deployments.web.config.resources.time_limit: "),
        (("time_limit = 30", "gpus = 1"), "deployments.web.config.resources.gpus: not a resource"),
        (('tenant = "team-a"', 'tenant = "a b"'), "deployments.web.tenant: 'a b' is not a tenant"),
        (("replicas = 2", "replica = 2"), "deployments.web.name: Object contains unknown field"),
    ],
)
def test_a_bad_deployment_is_named_with_its_line_and_field(
    edit: tuple[str, str], message: str
) -> None:
    error = error_of(GOOD.replace(*edit), "web")
    assert message in error, error
    assert error.startswith("d.toml:2: deployments.web."), error


def test_a_bad_name_is_refused() -> None:
    error = error_of(
        '[deployments."Web Server"]\nrecipe_name = "testing/openai-stub"\n', "Web Server"
    )
    assert "deployments.Web Server.name: 'Web Server' is not a deployment name" in error


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[deployments.web\n", "d.toml:1: not TOML"),
        (GOOD + "\n[deployments.web]\nrecipe_name = 'x'\n", "d.toml:15: not TOML"),  # twice
        ("[services.web]\n", "d.toml:1: services: only [deployments.<name>] tables"),
        ("deployments = 3\n", "d.toml:1: deployments: expected tables"),
    ],
)
def test_a_file_that_does_not_parse_is_refused_whole(text: str, message: str) -> None:
    with pytest.raises(DeploymentsFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(text, "d.toml", RECIPES)


def test_a_bad_edit_keeps_the_previous_version_and_is_logged_once(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text(GOOD)
    now = [0.0]
    file = DeploymentsFile(path, RECIPES, check_every=1, clock=lambda: now[0])
    web = file.current().deployments["web"]

    # One deployment broken: it keeps its version and says why; the other is untouched.
    path.write_text(GOOD.replace("STUB_TOKENS = 8", "STUB_TOKENS = -1"))
    os.utime(path, ns=(1, 1))
    now[0] = 5
    with capture_logs() as logs:
        declared = file.current()
        now[0] = 10
        file.current()
    assert declared.deployments["web"] == web
    assert "STUB_TOKENS" in declared.errors["web"]
    assert [e["event"] for e in logs] == ["deployments_file_loaded", "deployment_rejected"]

    # The whole file broken: everything stays as it was; said once.
    path.write_text("[deployments.web\n")
    now[0] = 20
    with capture_logs() as logs:
        assert file.current() is declared
        now[0] = 30
        assert file.current() is declared
    assert [e["event"] for e in logs] == ["deployments_file_rejected"]
    assert "d.toml:1: not TOML" in logs[0]["error"]


def test_a_file_that_cannot_be_used_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text("[deployments.web\n")
    with pytest.raises(DeploymentsFileError, match=r"d\.toml:1: not TOML"):
        DeploymentsFile(path, RECIPES)
    with pytest.raises(DeploymentsFileError, match="cannot read"):
        DeploymentsFile(tmp_path / "missing.toml", RECIPES)
