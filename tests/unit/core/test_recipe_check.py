from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jinja2
import pytest

from gateway.core import recipe_check, shell
from gateway.core.errors import RecipeError
from gateway.core.recipes import RecipeCatalog

ROOT = Path(__file__).resolve().parents[3]
VALUES = {
    "recipe": {"name": "cat/x", "description": "a recipe"},
    "resources": {"nodes": 1, "cpu": "2", "memory": "4G", "time_limit": 60, "gpu": None},
    "runtime": {"python": "python3", "opt": "errexit", "flags": "-e"},
    "service": {"kind": "http", "health_path": "/health"},
}


def check(folder: Path, source: str, **runtime: str) -> None:
    """The checks a recipe's template passes at load, on ``folder/job.sh.j2``."""
    path = folder / "job.sh.j2"
    path.write_text(source)
    env = shell.environment(jinja2.FileSystemLoader(folder))
    values: dict[str, Any] = {**VALUES, "runtime": {**VALUES["runtime"], **runtime}}
    recipe_check.check_template(env.get_template("job.sh.j2"), source, path, env, [values])


REFUSED = [
    # Request values: never template values.
    pytest.param(
        "set -u\necho {{ env.VLLM_MODEL }}\n", 2, "env.VLLM_MODEL is a request value", id="env"
    ),
    pytest.param('echo {{ env["X"] }}\n', 1, 'write "$X" in the script', id="env-item"),
    pytest.param("echo {{ env }}\n", 1, "'env' is not a value", id="env-whole"),
    pytest.param(
        "{% if false %}\n{% set env = 1 %}\n{% endif %}\necho {{ env }}\n",
        4,
        "'env' is not a value",
        id="env-set-in-a-branch",
    ),
    pytest.param("\necho {{ message }}\n", 2, "only the operator values", id="unknown-name"),
    pytest.param("{% for a in xs %}\necho {{ a }}\n{% endfor %}\n", 1, "'xs'", id="unknown-loop"),
    pytest.param("{% with q = 1 %}\n{% endwith %}\necho {{ q }}\n", 3, "'q'", id="out-of-scope"),
    pytest.param("echo {{ self }}\n", 1, "'self' is not a value", id="self"),
    # Where shlex.quote's quotes would be text: an operator value with a quote
    # in it would end the string (found by review: the first checker let these by).
    pytest.param('echo "starting {{ runtime.x }}"\n', 1, "inside double quotes", id="dquotes"),
    pytest.param("echo '{{ runtime.x }}'\n", 1, "inside single quotes", id="squotes"),
    pytest.param("cat <<'EOF'\n{{ runtime.x }}\nEOF\n", 2, "in a heredoc's body", id="heredoc"),
    pytest.param("true # {{ runtime.x }}\n", 1, "in a shell comment", id="comment"),
    pytest.param("echo \\{{ runtime.x }}\n", 1, "after a backslash", id="backslash"),
    # Jinja's globals are gone, and neither they nor the roots may be set, so a
    # name stored later or in a dead branch reaches nothing.
    pytest.param("{{ lipsum }}{% set lipsum = 1 %}\n", 1, "may only read", id="global-shadowed"),
    pytest.param(
        "{% if false %}{% set range = 1 %}{% endif %}{{ range }}\n",
        1,
        "may only read",
        id="global-in-dead-branch",
    ),
    pytest.param("{% set runtime = 1 %}\n", 1, "may only read", id="root-set"),
    pytest.param(
        "{% set s = recipe.name %}{% set f = s.format %}{{ f }}\n",
        1,
        "look-ups go into operator values only",
        id="set-chain",
    ),
    pytest.param("echo {{ lipsum }}\n", 1, "'lipsum' is not a value", id="global"),
    # Attribute and call tricks.
    pytest.param("echo {{ runtime.python.upper() }}\n", 1, "calls are not allowed", id="call"),
    pytest.param("echo {{ range(3) }}\n", 1, "calls are not allowed", id="global-call"),
    pytest.param("echo {{ runtime.python.upper }}\n", 1, "only one look-up", id="deep-lookup"),
    pytest.param("echo {{ runtime[runtime.opt] }}\n", 1, "plain key", id="computed-key"),
    pytest.param("echo {{ runtime.__class__ }}\n", 1, "__class__ is not a key", id="dunder"),
    pytest.param('echo {{ runtime["_x"] }}\n', 1, "_x is not a key", id="private-item"),
    pytest.param("echo {{ runtime | attr('x') }}\n", 1, "filter attr", id="attr-filter"),
    pytest.param("echo {{ runtime.python | replace('p', '$') }}\n", 1, "filter replace", id="f"),
    pytest.param("{% if runtime is sameas 1 %}\n{% endif %}\n", 1, "test sameas", id="test"),
    pytest.param("echo {{ {'a': 1} }}\n", 1, "Dict is not allowed", id="dict"),
    # Other files, and text that lands unchecked.
    pytest.param('echo ok\n{% include "other.sh.j2" %}\n', 2, "{% include %} pulls", id="include"),
    pytest.param('{% import "m.j2" as m %}\n', 1, "{% import %} pulls", id="import"),
    pytest.param('\n\n{% from "m.j2" import x %}\n', 3, "{% from %} pulls", id="from-import"),
    pytest.param('{% extends "base.sh.j2" %}\n', 1, "{% extends %} pulls", id="extends"),
    pytest.param("{% macro m() %}x{% endmacro %}\n", 1, "{% macro %}", id="macro"),
    pytest.param("{% call runtime() %}x{% endcall %}\n", 1, "{% call %}", id="call-block"),
    pytest.param("{% filter upper %}x{% endfilter %}\n", 1, "{% filter %}", id="filter-block"),
    pytest.param("{% autoescape true %}x{% endautoescape %}\n", 1, "autoescape", id="autoesc"),
    pytest.param("{% block b %}x{% endblock %}\n", 1, "{% block %}", id="block"),
    # Tracing would write the job's secrets into its log.
    pytest.param("set -u\nset -x\n", 2, "set -x", id="set-x"),
    pytest.param("set -euxo pipefail\n", 1, "set -x", id="combined-flags"),
    pytest.param("set -e -o pipefail -x\n", 1, "set -x", id="later-flag"),
    pytest.param("set -o xtrace\n", 1, "xtrace", id="set-o-xtrace"),
    pytest.param("shopt -so xtrace\n", 1, "xtrace", id="shopt-xtrace"),
    pytest.param("exec 3>>trace.log\nBASH_XTRACEFD=3\n", 2, "BASH_XTRACEFD", id="xtracefd"),
    pytest.param("PS4='+ $GW_SERVICE_KEY '\n", 1, "PS4", id="ps4"),
    pytest.param("bash -x step.sh\n", 1, "-x", id="bash-x"),
    pytest.param("trap 'set -x' DEBUG\n", 1, "set -x", id="quoted-set-x"),
    pytest.param("{# fine #}\n\n# set -x to debug\n", 3, "set -x", id="in-a-shell-comment"),
    # A value the shell runs or obeys.
    pytest.param("export BASH_ENV={{ runtime.python }}\n", 1, "BASH_ENV", id="bash-env"),
    pytest.param("\nSHELLOPTS={{ runtime.opt }}\n", 2, "SHELLOPTS", id="shellopts"),
    pytest.param("PROMPT_COMMAND={{ runtime.opt }}\n", 1, "PROMPT_COMMAND", id="prompt-cmd"),
    # Rendering with the recipe's values.
    pytest.param("echo ok\necho {{ runtime.missing }}\n", 2, "rendering with", id="undefined"),
    pytest.param(
        "sleep {{ runtime.python | raw_int }}\n", 1, "invalid literal for int()", id="raw-int"
    ),
]


@pytest.mark.parametrize(("source", "line", "reason"), REFUSED)
def test_refused(tmp_path: Path, source: str, line: int, reason: str) -> None:
    with pytest.raises(RecipeError) as info:
        check(tmp_path, source)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'job.sh.j2'}:{line}: "), message
    assert reason in message


def test_the_first_refusal_is_reported(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"job\.sh\.j2:2: env\.B is a request value"):
        check(tmp_path, "echo {{ recipe.name }}\necho {{ env.B }}\necho {{ env.C }}\n")


def test_include_of_a_real_file_is_refused(tmp_path: Path) -> None:
    """The recipe's own loader could find the file; it is refused all the same."""
    (tmp_path / "other.sh.j2").write_text("set -x\n")
    with pytest.raises(RecipeError, match=r"job\.sh\.j2:2: \{% include %\} pulls in"):
        check(tmp_path, 'set -u\n{% include "other.sh.j2" %}\n')


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("if true; then\n  echo\n", "syntax error"),
        ("echo $(\n", "unexpected EOF"),
        ('{% if resources.gpu %}\nfi\n{% endif %}\necho {{ recipe.name }} "\n', "matching `\"'"),
    ],
)
def test_the_rendered_script_must_be_valid_bash(tmp_path: Path, source: str, error: str) -> None:
    with pytest.raises(RecipeError) as info:
        check(tmp_path, source)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'job.sh.j2'}: rendered with the recipe's values")
    assert "is not valid bash" in message
    assert error in message


@pytest.mark.parametrize(
    ("source", "runtime"),
    [
        pytest.param("set -o {{ runtime.opt }}\n", {"opt": "xtrace"}, id="set-o-value"),
        pytest.param("set {{ runtime.flags }}\n", {"flags": "-ex"}, id="set-value"),
    ],
)
def test_operator_values_that_spell_xtrace_are_refused(
    tmp_path: Path, source: str, runtime: dict[str, str]
) -> None:
    check(tmp_path, source)  # with harmless values
    with pytest.raises(RecipeError, match=r"rendered with the recipe's values, line 1: xtrace"):
        check(tmp_path, source, **runtime)


ALLOWED = [
    pytest.param("echo {{ runtime.python }} '-' {{ recipe.name }}\n", id="values"),
    pytest.param('echo "-" {{ service.health_path }} {{ resources["cpu"] }}\n', id="item"),
    pytest.param("sleep {{ resources.time_limit | raw_int }}\n", id="raw-int"),
    pytest.param("echo {{ resources.gpu | default('0', true) }}\n", id="default"),
    pytest.param("{% if resources.gpu %}\necho gpu\n{% else %}\necho cpu\n{% endif %}\n", id="if"),
    pytest.param("{% if runtime.x is defined %}\necho {{ runtime.x }}\n{% endif %}\n", id="test"),
    pytest.param(
        "{% for k in runtime %}\necho {{ loop.index }} {{ k }}\n{% endfor %}\n", id="for-loop"
    ),
    pytest.param(
        "{% set n = resources.cpu ~ '/' ~ resources.nodes %}\n{% with m = 2 %}\n"
        "echo {{ n }} {{ m }}\n{% endwith %}\n",
        id="set-with",
    ),
    pytest.param("{% set x %}\nhi\n{% endset %}\necho {{ x }}\n", id="set-block"),
    pytest.param("{# {{ env.X }} and set -x #}\necho ok\n", id="jinja-comment"),
    pytest.param('{% raw %}echo "{{ env.X }}"{% endraw %}\n', id="raw-text"),
    pytest.param("set -euo pipefail\n# set +e below on purpose\nset +e\n", id="set-without-x"),
    pytest.param("set -- {{ runtime.opt }}\nexport HF_HOME={{ runtime.python }}\n", id="set-args"),
    pytest.param('echo "$VLLM_MODEL" "${PORT:-8000}"\n', id="environment-variables"),
]


@pytest.mark.parametrize("source", ALLOWED)
def test_allowed(tmp_path: Path, source: str) -> None:
    check(tmp_path, source)


@pytest.mark.parametrize("folder", ["recipes", "tests/recipes", "tests/recipes/schemathesis"])
def test_shipped_and_test_recipes_pass(folder: str) -> None:
    assert len(RecipeCatalog.load([ROOT / folder])) >= 1


def test_a_recipe_that_interpolates_a_request_value_is_refused_at_load(tmp_path: Path) -> None:
    recipe = tmp_path / "inference" / "vllm"
    shutil.copytree(ROOT / "recipes/inference/vllm", recipe)
    template = recipe / "job.sh.j2"
    lines = template.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("export VLLM_NO_USAGE"))
    lines.insert(at + 1, 'echo "model: "{{ env.VLLM_MODEL }}\n')
    template.write_text("".join(lines))
    with pytest.raises(RecipeError) as info:
        RecipeCatalog.load([tmp_path])
    assert str(info.value) == (
        f"{template}:{at + 2}: env.VLLM_MODEL is a request value, and request values never "
        'become shell text: they reach the job as environment variables; write "$VLLM_MODEL" '
        "in the script instead (a template may name only the operator values recipe, "
        "resources, runtime, service)"
    )


def test_a_site_overlay_value_is_checked_too(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('[runtime]\nextra_args = "--trust-remote-code"\nhf_home = "/x/xtrace"\n')
    with pytest.raises(RecipeError, match=r"rendered with the recipe's values, line .*: xtrace"):
        RecipeCatalog.load([ROOT / "recipes"], site)


def test_the_template_gets_operator_values_only() -> None:
    recipe = RecipeCatalog.load([ROOT / "recipes"]).get("inference/vllm")
    context = recipe.template_values(recipe.default_resources.as_config())
    assert sorted(context) == sorted(recipe_check.ROOTS)
    assert "gpt2" not in repr(context)
