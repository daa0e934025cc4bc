"""Write the OpenAPI document of the app to openapi/openapi.json (``make openapi``).

The document depends only on the code, not on settings, so placeholder
settings are used and nothing is contacted.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from gateway.app import create_app
from gateway.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "openapi" / "openapi.json"


def document() -> str:
    with tempfile.NamedTemporaryFile() as key:
        key.write(b"placeholder key, never used to sign" * 2)
        key.flush()
        settings = load_settings(
            {
                "GATEWAY_SLURM_URL": "http://slurmrestd.invalid:6820",
                "GATEWAY_SLURM_USER": "gateway",
                "GATEWAY_SLURM_JWT_KEY_FILE": key.name,
                "GATEWAY_RECIPES_DIRS": str(ROOT / "recipes"),
            }
        )
        schema = create_app(settings).openapi_schema.to_schema()
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> int:
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(document(), encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
