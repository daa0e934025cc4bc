"""Who a deployment's jobs are made as (wiring.deployment_principal)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import wiring
from gateway.auth.authenticate import Authenticator
from gateway.core.deployments.spec import Deployment, check
from gateway.core.errors import InvalidRequest
from gateway.core.principal import Role
from gateway.core.recipes import RecipeCatalog
from tests.support.app import TENANTS, stub_settings

ROOT = Path(__file__).resolve().parents[2]
RECIPES = RecipeCatalog.load([ROOT / "tests" / "recipes"])


def deployment(**table: object) -> Deployment:
    return check("web", {"recipe_name": "testing/openai-stub", **table}, RECIPES, "d.toml:1")


def principal_of(tmp_path: Path, **table: object):  # type: ignore[no-untyped-def]
    authenticate = Authenticator(stub_settings(tmp_path, auth_file=TENANTS))
    made = wiring.deployment_principal(authenticate, lambda: "gwuser", frozenset({"root"}))
    return made(deployment(**table))


def test_a_tenants_deployment_runs_as_its_slurm_user_within_its_limits(tmp_path: Path) -> None:
    principal = principal_of(tmp_path, tenant="team-b")
    assert (principal.tenant, principal.slurm_user, principal.role) == (
        "team-b",
        "gwteam",
        Role.USER,
    )
    assert principal.limits.max_services == 2


def test_a_shared_deployment_runs_as_the_gateway_only(tmp_path: Path) -> None:
    principal = principal_of(tmp_path)
    assert (principal.slurm_user, principal.role) == ("gwuser", Role.ADMIN)
    # Another user could rewrite what its jobs publish, and take every tenant's prompts.
    with pytest.raises(InvalidRequest, match="slurm_user: a shared deployment runs as"):
        principal_of(tmp_path, slurm_user="gwteam")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"tenant": "team-a", "slurm_user": "gwteam"}, "gwteam is not a Slurm user of tenant"),
        ({"tenant": "nobody"}, "tenant nobody has 0 Slurm users"),
        ({"tenant": "team-a", "slurm_user": "root"}, "root is in GATEWAY_DENIED_SLURM_USERS"),
    ],
)
def test_a_user_the_auth_file_does_not_give_the_tenant_is_refused(
    tmp_path: Path, table: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        principal_of(tmp_path, **table)
