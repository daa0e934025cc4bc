"""``/api/v1/recipes``: what can be started, with defaults and parameters."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import Parameter

from gateway.api.openapi import problem_responses
from gateway.api.schemas import RecipeResponse
from gateway.core.errors import NotFound
from gateway.core.recipes import Recipe, RecipeCatalog


class RecipesController(Controller):
    path = "/api/v1/recipes"
    tags = ("recipes",)

    @get(
        "/",
        operation_id="listRecipes",
        summary="List the recipes",
        responses=problem_responses(),
    )
    async def list_recipes(self, recipes: NamedDependency[RecipeCatalog]) -> list[RecipeResponse]:
        return [RecipeResponse.of(r) for r in recipes]

    @get(
        "/{recipe_name:path}",
        operation_id="getRecipe",
        responses=problem_responses(400, 404),
        summary="One recipe, by path (inference/vllm) or by unique name (vllm)",
    )
    async def get_recipe(
        self,
        recipes: NamedDependency[RecipeCatalog],
        recipe_name: Annotated[str, Parameter(description="e.g. inference/vllm")],
    ) -> RecipeResponse:
        return RecipeResponse.of(find(recipes, recipe_name.strip("/")))


def find(recipes: NamedDependency[RecipeCatalog], name: str) -> Recipe:
    if "/" in name:
        return recipes.get(name)
    matches = [r for r in recipes if r.name.split("/", 1)[1] == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        options = ", ".join(r.name for r in matches)
        raise NotFound(f"recipe name {name!r} is ambiguous; use one of {options}")
    return recipes.get(name)
