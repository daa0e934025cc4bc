"""The auth file (tenants, keys as hashes, the OIDC allow-list) and `new-key`."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
import structlog.testing

from gateway.auth.__main__ import main as auth_main
from gateway.auth.authfile import AuthFile, AuthFileError, new_key, parse
from gateway.core.principal import Limits, Method, Role
from tests.support.auth_files import identity, key_entry, oidc_entry, sha
from tests.support.clock import Clock

KEY_A = "sgw_team-a-key"
KEY_B = "sgw_team-b-key"
KEY_ADMIN = "sgw_admin-key"

TABLES = """
[defaults]
max_services = 3
max_gpus = 1

[tenants.team-a]
max_services = 8
max_gpus = 4
account = "proj-a"
"""
GOOD = "\n".join(
    [
        TABLES,
        key_entry("team-a", "alice", sha(KEY_A), name="ci"),
        key_entry("team-b", "bob", sha(KEY_B)),
        key_entry("ops", "alice", sha(KEY_ADMIN), role="admin"),
        oidc_entry("carol@example.org", "carol", "team-a"),
    ]
)


# --- parsing: errors name the entry and the field --------------------------------------


def test_a_good_file_parses() -> None:
    directory = parse(GOOD)
    assert len(directory.keys) == 3
    assert set(directory.oidc_users) == {"carol@example.org"}
    assert directory.slurm_users == {"alice", "bob", "carol"}


def test_bad_hex_names_the_entry_and_field() -> None:
    text = key_entry("a", "alice") + key_entry("b", "bob", digest="zz" * 32)
    with pytest.raises(AuthFileError, match=r"keys\[1\]\.sha256"):
        parse(text)


@pytest.mark.parametrize(
    "digest",
    ["ab" * 31, "ab" * 33, ("AB" * 32), "sgw_plain-key-instead-of-its-hash"],
    ids=["short", "long", "uppercase", "a-key-not-a-hash"],
)
def test_sha256_must_be_64_lowercase_hex(digest: str) -> None:
    with pytest.raises(AuthFileError, match=r"keys\[0\]\.sha256"):
        parse(key_entry("a", "alice", digest=digest))


def test_the_same_key_twice_is_refused_naming_the_second_entry() -> None:
    digest = sha("sgw_same")
    text = key_entry("a", "alice", digest) + key_entry("b", "bob", digest)
    with pytest.raises(AuthFileError, match=r"keys\[1\]\.sha256: the same key is listed twice"):
        parse(text)


@pytest.mark.parametrize(
    ("tenant", "slurm_user", "field"),
    [
        ("team a", "alice", "keys[0].tenant"),
        ("-team", "alice", "keys[0].tenant"),
        ("team/a", "alice", "keys[0].tenant"),
        ("team-a", "alice smith", "keys[0].slurm_user"),
        ("team-a", "0alice", "keys[0].slurm_user"),
        ("team-a", "root;rm", "keys[0].slurm_user"),
    ],
)
def test_bad_tenant_or_user_names_are_refused(tenant: str, slurm_user: str, field: str) -> None:
    with pytest.raises(AuthFileError) as caught:
        parse(key_entry(tenant, slurm_user))
    assert field in str(caught.value)


def test_an_empty_tenant_name_is_refused() -> None:
    with pytest.raises(AuthFileError, match=r"keys\[0\]\.tenant"):
        parse(key_entry("", "alice"))


def test_a_bad_tenant_table_name_is_refused() -> None:
    with pytest.raises(AuthFileError, match=r"tenants\.team a"):
        parse('[tenants."team a"]\nmax_services = 1\n')


def test_bad_oidc_user_entries_name_the_entry() -> None:
    text = (
        '[[oidc_users]]\nsubject = "a@x"\nslurm_user = "alice"\n'
        '[[oidc_users]]\nsubject = "b@x"\nslurm_user = "bob"\ntenant = "team b"\n'
    )
    with pytest.raises(AuthFileError, match=r"oidc_users\[1\]\.tenant: 'team b'"):
        parse(text)
    text = '[[oidc_users]]\nsubject = "b@x"\nslurm_user = "bad user"\ntenant = "team-b"\n'
    with pytest.raises(AuthFileError, match=r"oidc_users\[0\]\.slurm_user: 'bad user'"):
        parse(text)
    twice = (
        '[[oidc_users]]\nsubject = "a@x"\nslurm_user = "alice"\n'
        '[[oidc_users]]\nsubject = "a@x"\nslurm_user = "bob"\n'
    )
    with pytest.raises(AuthFileError, match=r"oidc_users\[1\]\.subject: 'a@x' is listed twice"):
        parse(twice)


def test_a_bad_oidc_slurm_user_without_tenant_is_blamed_on_slurm_user() -> None:
    """GATEWAY BUG (gateway/auth/authfile.py:104, Directory.__init__,
    `_check_names(where, user.tenant or user.slurm_user, ...)`): with no
    `tenant`, a bad `slurm_user` is reported as `oidc_users[0].tenant`, a field
    the entry does not have."""
    text = '[[oidc_users]]\nsubject = "b@x"\nslurm_user = "bad user"\n'
    with pytest.raises(AuthFileError) as caught:
        parse(text)
    assert "oidc_users[0].slurm_user" in str(caught.value), (
        f"the error names a field the entry does not have: {caught.value}"
    )


@pytest.mark.parametrize(
    ("text", "where", "field"),
    [
        (key_entry("a", "alice") + 'colour = "red"\n', "$.keys[0]", "colour"),
        ("[defaults]\nmax_service = 3\n", "$.defaults", "max_service"),
        ("[tenants.a]\nmax_gpu = 3\n", "tenants.a", "max_gpu"),
        ('[[oidc_user]]\nsubject = "a"\nslurm_user = "a"\n', "", "oidc_user"),
    ],
)
def test_unknown_fields_are_refused(text: str, where: str, field: str) -> None:
    with pytest.raises(AuthFileError) as caught:
        parse(text)
    message = str(caught.value)
    assert field in message
    assert where in message


def test_wrong_types_and_ranges_name_the_field() -> None:
    with pytest.raises(AuthFileError, match=r"tenants\.team-a\.max_gpus"):
        parse("[tenants.team-a]\nmax_gpus = -1\n")
    with pytest.raises(AuthFileError, match=r"defaults\.max_services"):
        parse('[defaults]\nmax_services = "four"\n')
    with pytest.raises(AuthFileError, match=r"keys\[0\]\.role"):
        parse(key_entry("a", "alice") + 'role = "root"\n')
    with pytest.raises(AuthFileError) as caught:
        parse(key_entry("a", "alice") + key_entry("b", "bob") + '[[keys]]\ntenant = "c"\n')
    assert "missing required field `slurm_user`" in str(caught.value)
    assert "$.keys[2]" in str(caught.value)


@pytest.mark.parametrize(
    "text",
    ["[tenants.team-a]\nmax_gpus = -1\n", "[tenants.team-a]\nmax_gpu = 1\n"],
    ids=["bad-value", "unknown-field"],
)
def test_errors_in_a_tenant_table_name_the_tenant(text: str) -> None:
    """GATEWAY BUG (gateway/auth/authfile.py:173, parse() passes msgspec's message
    on as is): a mistake in `[tenants.team-a]` is reported at
    `$.tenants[...]`, which does not say which of the tenants is broken."""
    with pytest.raises(AuthFileError) as caught:
        parse("[tenants.team-b]\nmax_gpus = 1\n" + text)
    assert "team-a" in str(caught.value), f"the error does not name the tenant: {caught.value}"


@pytest.mark.parametrize("text", ["keys = [", "[[keys]\ntenant = 1", "just words", "a = 1\na = 2"])
def test_not_toml_says_so(text: str) -> None:
    with pytest.raises(AuthFileError, match=r"^not TOML"):
        parse(text)


def test_an_empty_file_is_an_empty_directory() -> None:
    directory = parse("")
    assert directory.keys == {}
    assert directory.by_key(KEY_A) is None


# --- lookups ------------------------------------------------------------------------------


def test_by_key_finds_the_key_by_its_hash() -> None:
    directory = parse(GOOD)
    found = directory.by_key(KEY_A)
    assert found is not None
    assert identity(found) == ("team-a", "alice", Role.USER, Method.KEY)
    assert found.label == "ci"
    assert found.credentials is None
    admin = directory.by_key(KEY_ADMIN)
    assert admin is not None
    assert admin.is_admin
    assert (admin.tenant, admin.slurm_user) == ("ops", "alice")


@pytest.mark.parametrize(
    "presented",
    [
        "sgw_wrong",
        "",
        KEY_A + " ",
        KEY_A.upper(),
        KEY_A[:-1],
        sha(KEY_A),  # the stored hash itself is no key
    ],
)
def test_a_wrong_key_finds_nothing(presented: str) -> None:
    assert parse(GOOD).by_key(presented) is None


def test_a_key_without_name_is_labelled_by_its_hash_prefix_not_the_key() -> None:
    found = parse(GOOD).by_key(KEY_B)
    assert found is not None
    assert found.label == f"key {sha(KEY_B)[:8]}"
    assert KEY_B not in (found.label or "")


def test_tenant_limits_and_account_reach_the_principal() -> None:
    directory = parse(GOOD)
    listed = directory.by_key(KEY_A)
    assert listed is not None
    assert listed.limits == Limits(max_services=8, max_gpus=4)
    assert listed.account == "proj-a"


def test_unlisted_tenants_get_the_defaults() -> None:
    directory = parse(GOOD)
    unlisted = directory.by_key(KEY_B)
    assert unlisted is not None
    assert unlisted.limits == Limits(max_services=3, max_gpus=1)
    assert unlisted.account is None
    admin = directory.by_key(KEY_ADMIN)
    assert admin is not None
    assert admin.limits == Limits(max_services=3, max_gpus=1)


def test_without_defaults_there_is_no_limit() -> None:
    found = parse(key_entry("a", "alice", sha("sgw_x"))).by_key("sgw_x")
    assert found is not None
    assert found.limits == Limits(None, None)


def test_directory_principal_for_oidc_users_takes_the_tenant_limits() -> None:
    directory = parse(GOOD)
    principal = directory.principal(
        tenant="team-a", slurm_user="carol", role=Role.USER, method=Method.OIDC, label="c"
    )
    assert principal.limits == Limits(8, 4)
    assert principal.account == "proj-a"


# --- the file on disk: re-read when it changes ---------------------------------------------


def write(path: Path, text: str) -> None:
    """Replace the file the way a Secret update or an editor's save does."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text, encoding="utf-8")
    os.replace(fresh, path)


def watched(path: Path, text: str) -> tuple[AuthFile, Clock]:
    """``text`` written to ``path``, read through a clock the test moves."""
    write(path, text)
    clock = Clock(100.0)
    return AuthFile(path, clock=clock), clock


def test_a_broken_file_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text("keys = [", encoding="utf-8")
    with pytest.raises(AuthFileError, match="not TOML"):
        AuthFile(path)
    with pytest.raises(AuthFileError, match="cannot read"):
        AuthFile(tmp_path / "missing.toml")


def test_a_changed_file_is_reread_at_most_once_a_second(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    auth, clock = watched(path, key_entry("a", "alice", sha("sgw_old")))
    assert auth.current().by_key("sgw_old") is not None

    write(path, key_entry("b", "bob", sha("sgw_new")))
    clock.now = 100.5  # checked at 100.0: not yet
    assert auth.current().by_key("sgw_old") is not None
    assert auth.current().by_key("sgw_new") is None

    clock.now = 101.0
    with structlog.testing.capture_logs() as logs:
        current = auth.current()
    assert current.by_key("sgw_new") is not None
    assert current.by_key("sgw_old") is None  # a removed key stops working
    assert [e["event"] for e in logs] == ["auth_file_loaded"]
    assert logs[0]["keys"] == 1


def test_an_unchanged_file_is_not_reparsed(tmp_path: Path) -> None:
    auth, clock = watched(tmp_path / "auth.toml", GOOD)
    first = auth.current()
    for _ in range(3):
        clock.now += 5
        with structlog.testing.capture_logs() as logs:
            assert auth.current() is first
        assert logs == []


def test_an_edit_in_place_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(key_entry("a", "alice", sha("sgw_old")), encoding="utf-8")
    clock = Clock(100.0)
    auth = AuthFile(path, clock=clock)
    with path.open("a", encoding="utf-8") as f:
        f.write(key_entry("b", "bob", sha("sgw_added")))
    clock.now += 1
    assert auth.current().by_key("sgw_added") is not None
    assert auth.current().by_key("sgw_old") is not None


def test_a_broken_edit_keeps_the_old_keys_and_is_logged(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    auth, clock = watched(path, key_entry("a", "alice", sha("sgw_old")))

    write(path, key_entry("a", "alice", sha("sgw_old")) + key_entry("b", "bad user"))
    clock.now += 1
    with structlog.testing.capture_logs() as logs:
        current = auth.current()
    assert current.by_key("sgw_old") is not None
    rejected = [e for e in logs if e["event"] == "auth_file_rejected"]
    assert len(rejected) == 1
    assert rejected[0]["log_level"] == "error"
    assert rejected[0]["path"] == str(path)
    assert "keys[1].slurm_user" in rejected[0]["error"]

    write(path, "this is = = not toml")
    clock.now += 1
    with structlog.testing.capture_logs() as logs:
        assert auth.current().by_key("sgw_old") is not None
    assert [e["event"] for e in logs] == ["auth_file_rejected"]
    assert "not TOML" in logs[0]["error"]

    write(path, key_entry("a", "alice", sha("sgw_fixed")))
    clock.now += 1
    assert auth.current().by_key("sgw_fixed") is not None
    assert auth.current().by_key("sgw_old") is None


def test_a_vanished_file_keeps_the_keys_until_it_is_back(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    auth, clock = watched(path, key_entry("a", "alice", sha("sgw_old")))

    path.unlink()
    clock.now += 1
    with structlog.testing.capture_logs() as logs:
        assert auth.current().by_key("sgw_old") is not None
    assert [e["event"] for e in logs] == ["auth_file_unreadable"]
    assert logs[0]["log_level"] == "error"

    write(path, key_entry("a", "alice", sha("sgw_back")))
    clock.now += 1
    assert auth.current().by_key("sgw_back") is not None


def test_an_unreadable_replacement_keeps_the_old_keys(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    auth, clock = watched(path, key_entry("a", "alice", sha("sgw_old")))
    path.unlink()
    path.write_bytes(b"\xff\xfe not utf-8")
    clock.now += 1
    with structlog.testing.capture_logs() as logs:
        assert auth.current().by_key("sgw_old") is not None
    assert [e["event"] for e in logs] == ["auth_file_rejected"]
    assert "cannot read" in logs[0]["error"]


def test_the_symlinked_secret_layout_is_followed(tmp_path: Path) -> None:
    """Kubernetes mounts a Secret as auth.toml -> ..data/auth.toml, ..data -> a
    timestamped folder, and swaps ..data on an update."""
    first = tmp_path / "..2024_01"
    first.mkdir()
    (first / "auth.toml").write_text(key_entry("a", "alice", sha("sgw_v1")), encoding="utf-8")
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "auth.toml").symlink_to("..data/auth.toml")
    clock = Clock(100.0)
    auth = AuthFile(tmp_path / "auth.toml", clock=clock)
    assert auth.current().by_key("sgw_v1") is not None

    second = tmp_path / "..2024_02"
    second.mkdir()
    (second / "auth.toml").write_text(key_entry("a", "alice", sha("sgw_v2")), encoding="utf-8")
    (tmp_path / "..data_tmp").symlink_to(second.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    clock.now += 1
    assert auth.current().by_key("sgw_v2") is not None


# --- python -m gateway.auth new-key ----------------------------------------------------------


def printed_key(stderr: str) -> str:
    [line] = [x for x in stderr.splitlines() if "key" in x]
    return line.rsplit(" ", 1)[1]


def test_new_key_output_is_an_entry_for_the_printed_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert auth_main(["new-key", "--tenant", "team-a", "--slurm-user", "alice"]) == 0
    out, err = capsys.readouterr()
    key = printed_key(err)
    assert key.startswith("sgw_")
    assert key not in out  # only the hash goes into the file
    entry = tomllib.loads(out)["keys"][0]
    assert entry["sha256"] == sha(key)
    directory = parse(out)
    found = directory.by_key(key)
    assert found is not None
    assert (found.tenant, found.slurm_user, found.role) == ("team-a", "alice", Role.USER)


def test_new_key_admin_with_a_name_that_needs_quoting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = 'ci "nightly" \\ bench'
    args = ["new-key", "--tenant", "ops", "--slurm-user", "gw_user", "--role", "admin"]
    assert auth_main([*args, "--name", name]) == 0
    out, err = capsys.readouterr()
    key = printed_key(err)
    found = parse(out).by_key(key)
    assert found is not None
    assert found.is_admin
    assert found.label == name


def test_new_key_entries_append_to_an_existing_file(capsys: pytest.CaptureFixture[str]) -> None:
    text = GOOD
    keys = []
    for tenant in ("team-a", "team-c"):
        auth_main(["new-key", "--tenant", tenant, "--slurm-user", "dave"])
        out, err = capsys.readouterr()
        keys.append(printed_key(err))
        text += "\n" + out
    directory = parse(text)
    assert len(directory.keys) == 5
    a, c = (directory.by_key(k) for k in keys)
    assert a is not None and c is not None
    assert a.limits == Limits(8, 4)  # team-a's table
    assert c.limits == Limits(3, 1)  # the defaults
    assert keys[0] != keys[1]


@pytest.mark.parametrize(
    "args",
    [
        ["new-key", "--tenant", "team a", "--slurm-user", "alice"],
        ["new-key", "--tenant", "team-a", "--slurm-user", "al ice"],
        ["new-key", "--tenant", "team-a", "--slurm-user", "alice", "--role", "root"],
        ["new-key", "--slurm-user", "alice"],
        [],
    ],
)
def test_new_key_refuses_bad_arguments(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        auth_main(args)
    assert stopped.value.code == 2
    out, _ = capsys.readouterr()
    assert out == ""  # no entry to paste


@pytest.mark.parametrize(
    "name",
    ["n" * 65, "first line\nsecond line"],
    ids=["longer-than-64", "newline"],
)
def test_new_key_never_prints_an_entry_the_auth_file_refuses(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Either the command refuses the --name, or its entry loads: never an entry
    that a running gateway would reject (keeping the old file) on the next edit.

    GATEWAY BUG (gateway/auth/__main__.py:23 takes any --name, :44 `_toml` does
    not escape control characters): a name over 64 characters (KeySpec.name's
    limit) or with a newline prints an entry that the auth file refuses."""
    exit_code: object = None
    try:
        auth_main(["new-key", "--tenant", "team-a", "--slurm-user", "alice", "--name", name])
    except SystemExit as stopped:
        exit_code = stopped.code
    if exit_code is not None:
        assert exit_code == 2  # refused, with a usage message
        return
    out, err = capsys.readouterr()
    try:
        found = parse(out).by_key(printed_key(err))
    except AuthFileError as exc:
        pytest.fail(f"new-key --name {name!r} printed an entry the auth file refuses: {exc}")
    assert found is not None


def test_new_key_function_gives_a_long_random_key_and_its_hash() -> None:
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    for key, digest in keys:
        assert key.startswith("sgw_")
        assert len(key) >= 4 + 43  # 256 bits, URL-safe base64
        assert digest == sha(key)
