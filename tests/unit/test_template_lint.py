from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from subprocess import DEVNULL

import jinja2
import pytest

from gateway.core.errors import RecipeError
from gateway.core.shell import environment
from gateway.core.template_lint import lint_template
from tests.support import sandbox

ROOT = Path(__file__).resolve().parents[2]
PATH = Path("recipe/job.sh.j2")


@pytest.fixture(scope="module")
def env() -> jinja2.Environment:
    return environment()


@pytest.fixture
def box() -> Iterator[Path]:
    """Where the scripts below run: as nobody under root (tests/support/sandbox.py)."""
    with sandbox.folder() as path:
        yield path


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
    pytest.param("cat <<EOF\n\tEOF\necho {{ x }}\nEOF\n", 3, "unquoted heredoc", id="tab-not-end"),
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
    pytest.param("echo $[ {{ x }} + 1 ]\n", 1, "$[ ]", id="old-arithmetic"),
    pytest.param("echo $(( $(printf %s {{ x }}) ))\n", 1, "$(( ))", id="cmdsubst-in-arithmetic"),
]

# 1. Files pulled in by a tag are never linted: refused outright.
FILE_TAGS = [
    pytest.param('echo ok\n{% include "other.sh.j2" %}\n', 2, "include", id="include"),
    pytest.param('{% import "m.j2" as m %}\necho {{ m.x() }}\n', 1, "import", id="import"),
    pytest.param('\n\n{% from "m.j2" import x %}\n', 3, "from", id="from-import"),
    pytest.param('{% extends "base.sh.j2" %}\n', 1, "extends", id="extends"),
]

# 2. Tags must stand in plain script text, in one state per block.
TAGS = [
    pytest.param(
        '{% if a %}MSG="a{% else %}MSG="b{% endif %} {{ x }}"\n',
        1,
        "{% else %} inside double quotes",
        id="branch-inside-double-quotes",
    ),
    pytest.param("echo '{% if a %}x{% endif %}'\n", 1, "single quotes", id="single-quotes"),
    pytest.param(
        'echo "$(\n{% if a %}\necho 1\n{% endif %}\n)"\n',
        2,
        "double quotes",
        id="cmdsubst-inside-double-quotes",
    ),
    pytest.param("echo $(( 1 {% if a %}+ 1{% endif %} ))\n", 1, "arithmetic", id="arithmetic"),
    pytest.param("echo ${V:-{% if a %}x{% endif %}}\n", 1, "${...}", id="param"),
    pytest.param(
        "cat <<'EOF'\n{% if a %}\nEOF\necho \"\n{% endif %}\nEOF\n{{ x }}\"\n",
        2,
        "heredoc body",
        id="quoted-heredoc-body",
    ),
    pytest.param("cat <<EOF {% if a %}\nx\n{% endif %}\nEOF\n", 1, "<<", id="heredoc-line"),
    pytest.param(
        "echo ok # {% if a %}\necho {{ x }}\n{% endif %}\n", 1, "comment", id="shell-comment"
    ),
    pytest.param("echo \\{% if a %}Z{% endif %}{{ x }}\n", 1, "backslash", id="after-backslash"),
    pytest.param("echo a{% set y = 1 %}b\n", 1, "non-blank", id="glued-both-sides"),
    # Branches and loop passes must start and end in the same shell state.
    pytest.param(
        "{% if a %}echo {% else %}eval {% endif %}{{ x }}\n",
        1,
        "{% else %} stands in another shell state",
        id="command-word-per-branch",
    ),
    pytest.param(
        "eval {% if a %}; echo {% endif %}{{ x }}\n",
        1,
        "{% endif %} stands in another shell state",
        id="separator-in-branch",
    ),
    pytest.param(
        "{% if a %}\nif true; then\n{% endif %}\necho\nfi\n",
        3,
        "another shell state",
        id="opens-a-compound",
    ),
    pytest.param(
        "{% for a in xs %}--a {{ a }}{% endfor %}\n",
        1,
        "another shell state",
        id="loop-pass-changes-state",
    ),
    pytest.param(
        "e{% if a %} {% endif %}val {{ x }}\n", 1, "would run into", id="words-glued-if-skipped"
    ),
    pytest.param(
        'echo x{% if c %} {% endif %}# "{{ x }}"\n', 1, "would run into", id="comment-if-skipped"
    ),
    # A template that ends inside a construct.
    pytest.param('echo "abc\n', 1, "ends inside double quotes", id="end-in-double-quotes"),
    pytest.param("echo ok\necho $(abc\n", 2, "ends inside a $( )", id="end-in-cmdsubst"),
    pytest.param("echo `abc\n", 1, "ends inside backticks", id="end-in-backticks"),
    pytest.param("echo $(( 1 +\n", 1, "ends inside arithmetic", id="end-in-arithmetic"),
    pytest.param("echo 'abc\n", 1, "single quote that never closes", id="end-in-single-quote"),
    pytest.param("echo $'abc\n", 1, "never closes", id="end-in-ansi-c"),
    pytest.param("cat <<EOF\nabc\n", 1, "<<EOF never ends", id="unterminated-heredoc"),
    pytest.param("cat <<'EOF'", 1, "<<EOF never ends", id="heredoc-without-body"),
]

# 3. Words the shell evaluates as code even when quoted.
CODE = [
    pytest.param("[[ {{ x }} -eq 1 ]]\n", 1, "[[ ]]", id="dbracket"),
    pytest.param("[[ -n $a && {{ x }} -eq 1 ]]\n", 1, "[[ ]]", id="dbracket-after-and"),
    pytest.param("if [[ ( $a ) ]] || [[ {{ x }} ]]; then :; fi\n", 1, "[[ ]]", id="dbracket-if"),
    pytest.param("[[ $(printf %s {{ x }}) -eq 1 ]]\n", 1, "[[ ]]", id="cmdsubst-in-dbracket"),
    pytest.param("echo ${V:{{ x }}}\n", 1, "offset", id="substring-offset"),
    pytest.param("echo ${V:1:{{ x }}}\n", 1, "offset", id="substring-length"),
    pytest.param("echo ${V: -{{ x }}}\n", 1, "offset", id="substring-negative"),
    pytest.param("echo ${@:{{ x }}}\n", 1, "offset", id="substring-of-args"),
    pytest.param("echo ${A[{{ x }}]}\n", 1, "subscript", id="param-subscript"),
    pytest.param("A[{{ x }}]=1\n", 1, "subscript", id="assignment-subscript"),
    pytest.param("A=(--model {{ x }})\n", 1, "array assignment", id="compound-assignment"),
    pytest.param("export BASH_ENV={{ x }}\n", 1, "BASH_ENV", id="bash-env"),
    pytest.param("ENV={{ x }} sh job.sh\n", 1, "ENV", id="posix-env"),
    pytest.param("eval {{ x }}\n", 1, "argument of eval", id="eval"),
    pytest.param("x=1 command eval {{ x }}\n", 1, "argument of eval", id="eval-wrapped"),
    pytest.param("true && eval {{ x }}\n", 1, "argument of eval", id="eval-after-and"),
    pytest.param("if eval {{ x }}; then :; fi\n", 1, "argument of eval", id="eval-after-if"),
    pytest.param("f() { eval {{ x }}; }\n", 1, "argument of eval", id="eval-in-function"),
    pytest.param("case $a in\n  (x) eval {{ x }} ;;\nesac\n", 2, "eval", id="eval-in-case"),
    pytest.param("2>/dev/null eval {{ x }}\n", 1, "argument of eval", id="eval-after-redirect"),
    pytest.param('eval "$(printf %s {{ x }})"\n', 1, "eval", id="cmdsubst-in-eval"),
    pytest.param("let n={{ x }}\n", 1, "argument of let", id="let"),
    pytest.param("declare X={{ x }}\n", 1, "argument of declare", id="declare"),
    pytest.param("typeset -a X={{ x }}\n", 1, "argument of typeset", id="typeset"),
    pytest.param("f() { local X={{ x }}; }\n", 1, "argument of local", id="local"),
    pytest.param("readonly -a X={{ x }}\n", 1, "argument of readonly", id="readonly-flags"),
    pytest.param("export {{ x }}\n", 1, "argument of export", id="export-name"),
    pytest.param("export -n X={{ x }}\n", 1, "argument of export", id="export-flags"),
    pytest.param("trap {{ x }} EXIT\n", 1, "argument of trap", id="trap"),
    pytest.param("printf -v out %s {{ x }}\n", 1, "printf -v", id="printf-v"),
    pytest.param("printf {{ x }} {{ y }}\n", 1, "printf", id="printf-first-argument"),
    pytest.param("read {{ x }}\n", 1, "argument of read", id="read-name"),
    pytest.param("unset {{ x }}\n", 1, "argument of unset", id="unset"),
    pytest.param("source {{ x }}\n", 1, "argument of source", id="source"),
    pytest.param(". {{ x }}\n", 1, "argument of .", id="dot"),
    pytest.param("set {{ x }}\n", 1, "argument of set", id="set"),
    pytest.param("[ -v {{ x }} ]\n", 1, "test -v", id="test-v"),
    pytest.param("[ {{ x }} {{ y }} ]\n", 1, "test -v", id="test-two-values"),
    pytest.param("bash -c {{ x }}\n", 1, "bash -c", id="bash-c"),
    pytest.param("sh -c 'echo \"$1\"' sh {{ x }}\n", 1, "sh -c", id="sh-c-later-word"),
    pytest.param("bash -lc {{ x }}\n", 1, "bash -lc", id="bash-lc"),
    pytest.param("dash -ec {{ x }}\n", 1, "dash -ec", id="dash-ec"),
    pytest.param("zsh -c {{ x }}\n", 1, "zsh -c", id="zsh-c"),
    pytest.param("su -c {{ x }} nobody\n", 1, "argument of su", id="su-c"),
    pytest.param("sudo -u nobody sh -c {{ x }}\n", 1, "sh -c", id="sudo-sh-c"),
    pytest.param("sudo -s {{ x }}\n", 1, "sudo -s", id="sudo-s"),
    pytest.param("srun -N 1 bash -c {{ x }}\n", 1, "bash -c", id="wrapped-bash-c"),
    pytest.param("bash {{ x }} {{ y }}\n", 1, "reads its options", id="bash-option-value"),
    pytest.param("python3 -c {{ x }}\n", 1, "python3 -c", id="python-c"),
    pytest.param("{{ tool }} --flag {{ x }}\n", 1, "command whose name", id="command-is-a-value"),
    pytest.param('"$CMD" {{ x }}\n', 1, "command whose name", id="command-is-a-variable"),
    pytest.param("$(printf %s {{ x }})\n", 1, "command's name", id="cmdsubst-as-command"),
    # Code read from stdin.
    pytest.param("echo {{ x }} | bash\n", 1, "stdin of bash", id="piped-into-bash"),
    pytest.param("bash <<< {{ x }}\n", 1, "stdin of bash", id="here-string-to-bash"),
    pytest.param("bash < <(printf %s {{ x }})\n", 1, "stdin of bash", id="procsubst-to-bash"),
    pytest.param(
        "python3 - <<'PY'\nprint({{ x }})\nPY\n", 2, "stdin of python3", id="heredoc-to-python"
    ),
    pytest.param(
        "cat <<'EOF' | sh\n{{ x }}\nEOF\n", 2, "pipeline it feeds", id="heredoc-piped-to-sh"
    ),
    pytest.param(
        "printf %s {{ x }} | while read -r l; do :; done\n",
        1,
        "compound command",
        id="piped-into-loop",
    ),
    pytest.param(
        "declare -i N\nN={{ x | raw_int }}\n", 1, "integer variables", id="integer-attribute"
    ),
]

# 4. Tracing would write the job's secrets into its log.
XTRACE = [
    pytest.param("set -u\nset -x\n", 2, "set -x", id="set-x"),
    pytest.param("set -euxo pipefail\n", 1, "set -x", id="combined-flags"),
    pytest.param("set -e -o pipefail -x\n", 1, "set -x", id="later-flag"),
    pytest.param("set -o xtrace\n", 1, "xtrace", id="set-o-xtrace"),
    pytest.param("shopt -so xtrace\n", 1, "xtrace", id="shopt-xtrace"),
    pytest.param("exec 3>>trace.log\nBASH_XTRACEFD=3\n", 2, "BASH_XTRACEFD", id="xtracefd"),
    pytest.param("PS4='+ $GW_SERVICE_KEY '\n", 1, "PS4", id="ps4"),
    pytest.param("bash -x step.sh\n", 1, "-x", id="bash-x"),
    pytest.param("trap 'set -x' DEBUG\n", 1, "set -x", id="quoted-set-x"),
]


@pytest.mark.parametrize(("source", "line", "reason"), REFUSED + FILE_TAGS + TAGS + CODE + XTRACE)
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
    pytest.param("cat <<'PY'\nprint({{ x }})\nPY\necho {{ y }}\n", id="single-quoted-heredoc"),
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
    # Tags in plain script text, one state per block.
    pytest.param("{% if a %}\necho {{ x }}\n{% else %}\necho b\n{% endif %}\n", id="if-lines"),
    pytest.param("cmd {% if tp %}--tp {{ tp }}{% endif %}\n", id="inline-option"),
    pytest.param(
        "cmd \\\n{% if tp %}\n  --tp {{ tp }} \\\n{% endif %}\n  --port 1\n",
        id="continued-lines",
    ),
    pytest.param("cmd {% for a in xs %}--a {{ a }} {% endfor %}\n", id="loop-of-options"),
    pytest.param("X=$(\n{% if a %}\necho 1\n{% endif %}\n)\n", id="in-plain-cmdsubst"),
    pytest.param("{% set n = 1 %}\n{% with m = 2 %}\necho {{ n }}\n{% endwith %}\n", id="set-with"),
    pytest.param(
        "{% for x in xs %}\n{% if x %}\necho {{ x }}\n{% endif %}\n{% endfor %}\n",
        id="nested-blocks",
    ),
    # Commands that take a value as data.
    pytest.param("export HF_HOME={{ x }} B={{ y }}\nreadonly C={{ z }}\n", id="export-value"),
    pytest.param("read -r -a ARGS <<< {{ x }}\n", id="here-string-to-read"),
    pytest.param("[ -n {{ x }} ] && [ {{ y }} = 1 ]\n", id="test-operands"),
    pytest.param("printf '%s\\n' {{ x }} {{ y }}\n", id="printf-arguments"),
    pytest.param("set -- {{ x }} {{ y }}\n", id="set-positional"),
    pytest.param("echo eval {{ x }}; cp a . {{ y }}\n", id="code-words-as-arguments"),
    pytest.param("exec {{ x }}\n", id="exec-value"),
    pytest.param("A[1]={{ x }}; A+=($(printf %s {{ y }}))\n", id="array-values"),
    pytest.param("python3 serve.py --model {{ x }}\n", id="python-script-arguments"),
    pytest.param("python3 -m vllm.entrypoints.openai.api_server --model {{ x }}\n", id="python-m"),
    pytest.param("bash job.sh {{ x }}\n", id="shell-script-arguments"),
    pytest.param("printf %s {{ x }} | python3 -c 'import sys; sys.stdin.read()'\n", id="pipe-data"),
    pytest.param("[[ -n $A ]] && echo {{ x }}\n", id="after-dbracket"),
    pytest.param('echo "${x:-$(printf %s {{ y }})}" {{ z }} >{{ f }} 2>&1\n', id="redirect"),
    pytest.param('while read -r l; do echo "$l"; done < <(ls {{ d }})\n', id="read-loop"),
    pytest.param(
        "set -euo pipefail\n# set +e below on purpose\nset +e\n", id="set-flags-without-x"
    ),
]


@pytest.mark.parametrize("source", ALLOWED)
def test_allowed(env: jinja2.Environment, source: str) -> None:
    lint_template(source, PATH, env)


@pytest.mark.parametrize(
    "template",
    [
        "recipes/inference/vllm/job.sh.j2",
        "tests/recipes/testing/http/job.sh.j2",
        "tests/recipes/testing/openai-stub/job.sh.j2",
    ],
)
def test_shipped_templates_pass(env: jinja2.Environment, template: str) -> None:
    path = ROOT / template
    lint_template(path.read_text(), path, env)


# Each rendered with the value below, bash runs the value's command: why they are refused.
RUNS_THE_VALUE = [
    pytest.param('{% if a %}MSG="a{% else %}MSG="b{% endif %} {{ x }}"\n', id="branch-quotes"),
    pytest.param("[[ {{ x }} -eq 1 ]]\n", id="dbracket"),
    pytest.param("V=abc\necho ${V:{{ x }}}\n", id="substring"),
    pytest.param("eval {{ x }}\n", id="eval"),
    pytest.param("let n={{ x }}\n", id="let"),
    pytest.param("A=(1)\ntypeset A={{ x }}\n", id="typeset"),
    pytest.param("read {{ x }} <<< 1\n", id="read"),
    pytest.param("printf -v {{ x }} %s 1\n", id="printf-v"),
    pytest.param("bash -c {{ x }}\n", id="bash-c"),
    pytest.param("echo {{ x }} | bash\n", id="pipe"),
]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("source", RUNS_THE_VALUE)
def test_refused_templates_do_run_the_value(
    env: jinja2.Environment, box: Path, source: str
) -> None:
    with pytest.raises(RecipeError):
        lint_template(source, PATH, env)
    for value in ["a[$(touch ran)]", "$(touch ran)", "touch ran", "([0]=$(touch ran))"]:
        script = env.from_string(source).render(a=True, x=value)
        sandbox.run(["bash", "-c", script], cwd=box, stdin=DEVNULL, capture_output=True)
    assert (box / "ran").exists()


HOSTILE = ["a[$(touch ran)]", "$(touch ran)", "'; touch ran; '", '"; touch ran; "', "`touch ran`"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("source", ALLOWED)
def test_allowed_templates_keep_hostile_values_inert(
    env: jinja2.Environment, box: Path, source: str
) -> None:
    template = env.from_string(source)
    names = ["x", "y", "z", "a", "tp", "f", "d", "m", "n"]
    tries = [dict.fromkeys(names, value) for value in HOSTILE]
    tries += [{**dict.fromkeys(names, "touch ran"), "x": flag} for flag in ("-c", "-v", "eval")]
    for values in tries:
        values.update(port=1, n=2, xs=[values["x"], values["y"]])
        for truth in (True, False):
            script = template.render({**values, "a": truth, "tp": values["x"] if truth else ""})
            sandbox.run(
                # Python is not what's under test here, and it is slow to start.
                ["bash", "-c", "python3() { cat >/dev/null; }\n" + script],
                cwd=box,
                stdin=DEVNULL,
                capture_output=True,
                timeout=30,
            )
            assert not (box / "ran").exists(), script


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_scripts_run_cannot_change_the_machine(env: jinja2.Environment, box: Path) -> None:
    """The case that renamed the machine once, as the tests above run it."""
    before = socket.gethostname()
    script = env.from_string('echo "$(hostname "a")" {{ x }}\nid -u\n').render(x="b")
    done = sandbox.run(["bash", "-c", script], cwd=box, capture_output=True, text=True)
    assert socket.gethostname() == before
    assert done.stdout.split()[-1] != "0"  # not root


@pytest.mark.parametrize(
    ("tag", "why"),
    [
        ("{% macro m() %}x{% endmacro %}{{ m() }}", "macro"),
        ("{% call m() %}x{% endcall %}", "call"),
        ("{% filter replace('Q', \"'\") %}echo Q{{ x }}Q{% endfilter %}", "rewrites"),
        ("{% autoescape true %}echo {{ x }}{% endautoescape %}", "escaping"),
    ],
)
def test_other_tags_are_refused(env: jinja2.Environment, tag: str, why: str) -> None:
    with pytest.raises(RecipeError, match=r"^recipe/job\.sh\.j2:1: .*only if, for, set and with"):
        lint_template(f"{tag}\n", PATH, env)
    with pytest.raises(RecipeError, match=why):
        lint_template(f"{tag}\n", PATH, env)


def test_include_of_a_real_file_is_refused(tmp_path: Path) -> None:
    """The recipe's own loader could find the file; the lint refuses it all the same."""
    (tmp_path / "other.sh.j2").write_text('echo "{{ x }}"\n')
    env = environment(jinja2.FileSystemLoader(tmp_path))
    source = 'set -u\n{% include "other.sh.j2" %}\n'
    env.from_string(source)  # a valid template
    with pytest.raises(RecipeError, match=r"^recipe/job\.sh\.j2:2: \{% include %\} pulls in"):
        lint_template(source, PATH, env)


def test_jinja_syntax_error_is_a_recipe_error(env: jinja2.Environment) -> None:
    with pytest.raises(RecipeError, match=r"^recipe/job\.sh\.j2:2: template: "):
        lint_template("echo ok\necho {{ ) }}\n", PATH, env)
