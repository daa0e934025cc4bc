"""``python -m gateway.auth new-key --tenant T --slurm-user U [--role admin]``.

Prints a new API key (give it to the client, once) and the ``[[keys]]`` entry
for the auth file, which holds only its hash.
"""

from __future__ import annotations

import argparse
import sys

from gateway.auth.authfile import new_key
from gateway.core.principal import SLURM_USER, TENANT, Role


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.auth")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("new-key", help="a new API key and its auth-file entry")
    make.add_argument("--tenant", required=True)
    make.add_argument("--slurm-user", required=True)
    make.add_argument("--role", choices=[r.value for r in Role], default=Role.USER.value)
    make.add_argument("--name", help="a label for the audit log")
    args = parser.parse_args(argv)
    if not TENANT.fullmatch(args.tenant):
        parser.error(f"--tenant: not a tenant name ({TENANT.pattern})")
    if not SLURM_USER.fullmatch(args.slurm_user):
        parser.error("--slurm-user: not a user name")
    if args.name is not None and (
        not 1 <= len(args.name) <= 64 or not all(" " <= c != "\x7f" for c in args.name)
    ):
        parser.error("--name: 1 to 64 characters, no control characters")
    key, digest = new_key()
    print(f"key (give it to the client; it is not stored): {key}", file=sys.stderr)
    lines = ["[[keys]]"]
    if args.name:
        lines.append(f"name = {_toml(args.name)}")
    lines += [
        f"tenant = {_toml(args.tenant)}",
        f"slurm_user = {_toml(args.slurm_user)}",
        f"role = {_toml(args.role)}",
        f'sha256 = "{digest}"',
    ]
    print("\n".join(lines))
    return 0


def _toml(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


if __name__ == "__main__":
    raise SystemExit(main())
