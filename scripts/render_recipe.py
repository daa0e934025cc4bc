"""Print a recipe's job script body as the gateway renders it: the template
with the recipe's own operator values (and a site overlay's, with --site), on
its default resources. It loads the recipe as the gateway does, so every check
of a recipe at load runs first (gateway/core/recipe_check.py).

    python scripts/render_recipe.py recipes/inference/vllm | shellcheck -s bash -

The gateway's preamble (gw_phase, gw_start...; gateway/core/jobscript.py) is
not printed: the body is the recipe's own, which is what shellcheck judges.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.core.errors import RecipeError
from gateway.core.recipes import RecipeCatalog


def render(folder: Path, site: Path | None = None) -> str:
    folder = folder.resolve()
    catalog = RecipeCatalog.load([folder.parent.parent], site)
    recipe = catalog.get(f"{folder.parent.name}/{folder.name}")
    values = recipe.template_values(recipe.default_resources.as_config())
    return recipe.render(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("folder", type=Path, help="the recipe's folder (<category>/<name>)")
    parser.add_argument("--site", type=Path, help="a site overlay (GATEWAY_SITE_FILE)")
    args = parser.parse_args()
    try:
        sys.stdout.write(render(args.folder, args.site))
    except RecipeError as exc:
        print(f"render_recipe: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
