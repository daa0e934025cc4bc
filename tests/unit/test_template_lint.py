from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

from gateway.core.errors import RecipeError
from gateway.core.shell import environment
from gateway.core.template_lint import lint_template

ROOT = Path(__file__).resolve().parents[2]
PATH = Path("recipe/job.sh.j2")


@pytest.fixture(scope="module")
def env() -> jinja2.Environment:
    return environment()


REFUSED = [
    pytest.param('set -u\necho "hello {{ x }}"\n', 2, "double quotes", id="double-quotes"),
    pytest.param("set -u\n\necho 'hello {{ x }}'\n", 3, "single quotes", id="single-quotes"),
    pytest.param(
        "cat <<EOF >conf\nname=x\nvalue={{ x }}\nEOF\n", 3, "unquoted heredoc", id="heredoc"
    ),
    pytest.param(
        "if true; then\n\tcat <<-EOF\n\tvalue={{ x }}\n\tEOF\nfi\n",
        3,
        "unquoted heredoc",
        id="heredoc-strip-tabs",
    ),
    # Without the dash a tab-indented end line does not end the heredoc.
    pytest.param("cat <<EOF\n\tEOF\necho {{ x }}\n", 3, "unquoted heredoc", id="tab-not-end"),
    pytest.param(
        "cat <<'A' <<B\n{{ x }}\nA\n{{ y }}\nB\n", 4, "unquoted heredoc", id="second-heredoc"
    ),
    pytest.param('echo "$(hostname "a") {{ x }}"\n', 1, "double quotes", id="after-cmdsubst"),
    pytest.param("echo $'a\\'{{ x }}'\n", 1, "$'...'", id="ansi-c"),
    pytest.param("echo $(( {{ x }} + 1 ))\n", 1, "$(( ))", id="arithmetic"),
    pytest.param('echo "${V:-{{ x }}}"\n', 1, "${...}", id="param-in-double-quotes"),
    pytest.param('echo "${V:-"{{ x }}"}"\n', 1, "double quotes", id="nested-double-quotes"),
    pytest.param("echo \\{{ x }}\n", 1, "backslash", id="after-backslash"),
    pytest.param("echo ${{ x }}\n", 1, "right after $", id="after-dollar"),
    pytest.param("cat <<{{ x }}\nbody\n", 1, "delimiter", id="heredoc-delimiter"),
    pytest.param('echo a#b "{{ x }}"\n', 1, "double quotes", id="hash-inside-word"),
    pytest.param(
        '{% if a %}\necho ok\n{% else %}\necho "{{ x }}"\n{% endif %}\n',
        4,
        "double quotes",
        id="inside-if-block",
    ),
]


@pytest.mark.parametrize(("source", "line", "reason"), REFUSED)
def test_refused(env: jinja2.Environment, source: str, line: int, reason: str) -> None:
    with pytest.raises(RecipeError) as info:
        lint_template(source, PATH, env)
    message = str(info.value)
    assert message.startswith(f"{PATH}:{line}: ")
    assert reason in message


def test_first_offending_expression_is_reported(env: jinja2.Environment) -> None:
    with pytest.raises(RecipeError, match=r"^recipe/job\.sh\.j2:2: .*single quotes"):
        lint_template("echo {{ a }}\necho '{{ b }}'\necho \"{{ c }}\"\n", PATH, env)


ALLOWED = [
    pytest.param("echo {{ x }}\n", id="plain-word"),
    pytest.param("echo \"text \"{{ x }} 'more '{{ y }}\n", id="after-closing-quote"),
    pytest.param(
        "python3 - <<'PY'\nprint({{ x }})\nPY\necho {{ y }}\n", id="single-quoted-heredoc"
    ),
    pytest.param('cat <<"EOF"\n{{ x }}\nEOF\n', id="double-quoted-heredoc"),
    pytest.param("cat <<\\EOF\n{{ x }}\nEOF\n", id="backslash-heredoc"),
    pytest.param("cat <<E'O'F\n{{ x }}\nEOF\n", id="partly-quoted-heredoc"),
    pytest.param("cat <<-'EOF'\n\t{{ x }}\n\tEOF\necho {{ y }}\n", id="quoted-strip-tabs"),
    pytest.param("cat <<'A' <<'B'\n{{ x }}\nA\n{{ y }}\nB\necho {{ z }}\n", id="two-heredocs"),
    pytest.param("read -r -a ARGS <<< {{ x }}\necho {{ y }}\n", id="here-string"),
    pytest.param('  # don\'t use "{{ x }}" here\necho {{ y }}\n', id="shell-comment"),
    pytest.param("{# \"{{ x }}\" and '{{ y }}' #}\necho {{ z }}\n", id="jinja-comment"),
    pytest.param('echo "$(printf %s {{ x }})"\n', id="cmdsubst-in-double-quotes"),
    pytest.param("echo $(printf %s {{ x }}) `printf %s {{ y }}`\n", id="cmdsubst-plain"),
    pytest.param('echo "$(hostname "a")" {{ x }}\n', id="nested-quotes-in-cmdsubst"),
    pytest.param("cat <<EOF\n$(printf %s {{ x }})\nEOF\n", id="cmdsubst-in-heredoc"),
    pytest.param("WHY=$(cmd <<'PY' 2>&1\n{{ x }}\nPY\n); echo {{ y }}\n", id="heredoc-in-cmdsubst"),
    pytest.param("echo \"a\\\"b\" 'it'\\''s' {{ x }}\n", id="escaped-quotes"),
    pytest.param("echo \"${WHY##*$'\\n'}\" {{ x }}\n", id="ansi-c-in-param"),
    pytest.param("echo $(( 1 << 2 )) {{ x }}\n", id="shift-is-no-heredoc"),
    pytest.param("echo ${V:-{{ x }}}\n", id="param-in-plain"),
    pytest.param('echo "port {{ port | raw_int }}" $(( {{ n | raw_int }} + 1 ))\n', id="raw-int"),
    pytest.param('{% raw %}echo "{{ x }}"{% endraw %}\n', id="jinja-raw-text"),
]


@pytest.mark.parametrize("source", ALLOWED)
def test_allowed(env: jinja2.Environment, source: str) -> None:
    lint_template(source, PATH, env)


@pytest.mark.parametrize(
    "template", ["recipes/inference/vllm/job.sh.j2", "tests/recipes/testing/http/job.sh.j2"]
)
def test_shipped_templates_pass(env: jinja2.Environment, template: str) -> None:
    path = ROOT / template
    lint_template(path.read_text(), path, env)


def test_jinja_syntax_error_is_a_recipe_error(env: jinja2.Environment) -> None:
    with pytest.raises(RecipeError, match=r"^recipe/job\.sh\.j2:2: template: "):
        lint_template("echo ok\necho {{ ) }}\n", PATH, env)
