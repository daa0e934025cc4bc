"""Container images that cannot run, and a node without the runtime: each
service ends `failed` with a reason naming it. The live Apptainer walk (cold,
warm) is tests/support/containers.py, run beside tests/integration/test_stop.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.clusters import TIMINGS, named
from tests.support.containers import own_cache, site_file, walk
from tests.support.gateway_process import serving


@pytest.fixture
def cache() -> Iterator[tuple[str, Path]]:
    with own_cache() as folders:
        yield folders


async def test_broken_images_and_a_missing_runtime_fail_naming_them(
    tmp_path: Path, cache: tuple[str, Path]
) -> None:
    c2605, c2411 = named("c2605", "c2411")
    image_cache, host_cache = cache
    host_cache.mkdir(parents=True)
    uid, gid = c2605.user_ids(c2605.user)
    home = f"/home/{c2605.user}/{image_cache[2:]}"
    # A corrupt archive, and a corrupt image already in the cache.
    (host_cache / "garbage.oci.tar").write_bytes(b"not an archive\n" * 1000)
    (host_cache / "broken.sif").write_bytes(b"SIF_MAGIC but no image\n" * 1000)
    for path in (host_cache, *host_cache.iterdir()):
        os.chown(path, uid, gid)
    # An attack: an archive another cluster user may change (in /tmp, 0666).
    planted = Path(c2605.chroot) / "tmp" / f"gw-planted-{host_cache.name}.oci.tar"
    planted.write_bytes(b"whatever the other user wants run\n")
    planted.chmod(0o666)
    cases = {
        "missing": (
            c2605,
            {"image": "missing", "image_source": "oci-archive:/srv/images/none.oci.tar"},
        ),
        "corrupt archive": (
            c2605,
            {"image": "garbage", "image_source": f"oci-archive:{home}/garbage.oci.tar"},
        ),
        "corrupt image": (c2605, {"image": "broken"}),
        "planted source": (
            c2605,
            {"image": "planted", "image_source": f"oci-archive:/tmp/{planted.name}"},
        ),
        "no runtime": (c2411, {}),
    }

    async def one(name: str) -> tuple[str, dict[str, Any]]:
        cluster, runtime = cases[name]
        site = site_file(tmp_path, image_cache=image_cache, **runtime)
        async with serving(cluster, GATEWAY_SITE_FILE=str(site)) as api:
            created = await api.post("/api/v1/services", json={"recipe_name": "inference/vllm"})
            sid = created.json()["id"]
            try:
                ended = await walk(api, sid, {}, time.monotonic())
            finally:
                await api.delete(f"/api/v1/services/{sid}")
            return name, ended

    try:
        results = dict(await asyncio.gather(*(one(name) for name in cases)))
    finally:
        planted.unlink()
    reasons = {name: r["status_reason"] for name, r in results.items()}
    assert {name: r["status"] for name, r in results.items()} == dict.fromkeys(cases, "failed"), (
        reasons
    )
    assert (
        reasons["missing"] == "the image source /srv/images/none.oci.tar does not exist on c2605-n1"
    )
    assert reasons["planted source"] == (
        f"the image source /tmp/{planted.name} on c2605-n1 may be changed by users other "
        f"than {c2605.user}; not used"
    )
    assert "could not convert the image garbage" in reasons["corrupt archive"]
    assert (
        "the image" in reasons["corrupt image"]
        and "broken.sif does not run" in reasons["corrupt image"]
    )
    assert reasons["no runtime"] == "apptainer is not available on c2411-n1"
    TIMINGS.append(
        "containers, failing as they should: "
        + "; ".join(f"{k}: {v!r}" for k, v in reasons.items())
    )
