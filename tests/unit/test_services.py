"""ServiceManager behaviour that needs exact control of slurmrestd's answers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
from pytest_httpx import HTTPXMock

from gateway.core import metadata
from gateway.core.recipes import RecipeCatalog
from gateway.core.services import ServiceManager
from gateway.core.status import ServiceStatus
from gateway.slurm import MintedTokens, SlurmClient
from gateway.upstream.probe import HealthProber

ROOT = Path(__file__).resolve().parents[2]
URL = "http://slurmrestd.test"
PING = {"pings": [{"hostname": "c", "responding": True}], "meta": {"slurm": {"release": "x"}}}


def job(job_id: int, comment: str, state: str = "RUNNING") -> dict[str, Any]:
    return {
        "job_id": job_id,
        "name": "gw-testing-http",
        "user_name": "gwuser",
        "job_state": [state],
        "batch_host": "node1",
        "nodes": "node1",
        "comment": comment,
        "submit_time": {"set": True, "number": 1_800_000_000},
        "start_time": {"set": True, "number": 1_800_000_010},
    }


def service_comment(port: int) -> str:
    meta = metadata.ServiceMeta(recipe="testing/http", created=1_800_000_000.0)
    return f"{metadata.encode(meta)}|phase=starting|endpoint=node1:{port}"


def manager() -> ServiceManager:
    slurm = SlurmClient(URL, MintedTokens(b"k" * 32, "gwuser"), api_version="v0.0.42")
    return ServiceManager(
        slurm=slurm,
        recipes=RecipeCatalog.load([ROOT / "recipes", ROOT / "tests" / "recipes"]),
        prober=HealthProber(timeout=1, ttl=5),
        job_dir="/home/gwuser",
        slurm_user="gwuser",
    )


async def test_listing_costs_one_slurm_call_and_probes_run_concurrently(
    httpx_mock: HTTPXMock,
) -> None:
    ports = [9001, 9002, 9003, 9004]
    jobs = [job(10 + i, service_comment(p)) for i, p in enumerate(ports)]
    jobs.append(job(99, "not ours"))
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    httpx_mock.add_response(
        url=f"{URL}/slurm/v0.0.42/jobs",
        json={"jobs": jobs, "last_update": {"set": True, "number": 5}},
        is_reusable=True,
    )
    in_flight = 0
    most = 0

    async def health(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.2)
        in_flight -= 1
        return httpx.Response(200 if request.url.port != 9004 else 503)

    httpx_mock.add_callback(
        health, url=httpx.URL("http://node1/health").copy_with(), is_optional=True
    )
    for port in ports:
        httpx_mock.add_callback(health, url=f"http://node1:{port}/health", is_reusable=True)

    services = manager()
    listed = await services.list()
    assert [s.id for s in listed] == ["13", "12", "11", "10"]
    assert [s.status for s in listed] == [
        ServiceStatus.STARTING,  # port 9004 answers 503
        ServiceStatus.RUNNING,
        ServiceStatus.RUNNING,
        ServiceStatus.RUNNING,
    ]
    assert most == len(ports), "health probes ran one after another"
    await services.list()  # within the cache window: no new probes
    jobs_calls = httpx_mock.get_requests(url=f"{URL}/slurm/v0.0.42/jobs")
    assert len(jobs_calls) == 2
    assert len([r for r in httpx_mock.get_requests() if r.url.path == "/health"]) == len(ports)
    await services.prober.aclose()
    await services.slurm.aclose()


async def test_comment_from_the_job_is_parsed_not_trusted(httpx_mock: HTTPXMock) -> None:
    meta = metadata.ServiceMeta(recipe="testing/http", created=1_800_000_000.0)
    evil = f"{metadata.encode(meta)}|phase=running|endpoint=169.254.169.254/latest:80"
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/job/7", json={"jobs": [job(7, evil)]})
    services = manager()
    service = await services.get("7")
    # A malformed endpoint is ignored: no probe is sent, the service is building.
    assert service.endpoint is None
    assert service.status is ServiceStatus.BUILDING
    assert json.loads(json.dumps(service.config.environment)) == {}
    await services.prober.aclose()
    await services.slurm.aclose()


async def test_prompt_path_asks_slurm_once_per_ttl(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    httpx_mock.add_response(
        url=f"{URL}/slurm/v0.0.42/job/7",
        json={"jobs": [job(7, service_comment(9100))]},
        is_reusable=True,
    )
    httpx_mock.add_response(url="http://node1:9100/health", is_reusable=True)
    services = manager()
    first = await services.running("7")
    second = await services.running("7")
    assert first.status is ServiceStatus.RUNNING
    assert second == first
    assert len(httpx_mock.get_requests(url=f"{URL}/slurm/v0.0.42/job/7")) == 1
    await services.prober.aclose()
    await services.slurm.aclose()
