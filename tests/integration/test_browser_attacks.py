"""A live gateway without client authentication (what ``make run`` serves), on
each local cluster, against what a web page the user opens can send it: a
cross-site ``text/plain`` POST and a name rebound to 127.0.0.1. And two
requests sending one X-Request-ID, found apart in its access log."""

from __future__ import annotations

import json

import httpx

from gateway.testing.clusters import LocalCluster
from tests.support.clusters import TIMINGS
from tests.support.gateway_process import GatewayProcess
from tests.support.polling import poll

CREATE = b'{"recipe_name": "testing/http"}'
PAGE = "https://attacker.example"


async def test_web_pages_get_nothing_from_an_unauthenticated_gateway(
    cluster: LocalCluster,
) -> None:
    with GatewayProcess(cluster) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as api:
            before = (await api.get("/api/v1/services")).json()
            cross_site = await api.post(
                "/api/v1/services",
                content=CREATE,
                headers={"Content-Type": "text/plain", "Origin": PAGE},
            )
            no_origin = await api.post(
                "/api/v1/services", content=CREATE, headers={"Content-Type": "text/plain"}
            )
            prompt = await api.post(
                "/api/v1/vllm/1/prompt",
                content=b'{"prompt": "hi"}',
                headers={"Content-Type": "text/plain"},
            )
            rebound = {"Host": f"attacker.example:{gateway.port}"}
            listing = await api.get("/api/v1/services", headers=rebound)
            probes = [
                (await api.get(path, headers=rebound)).status_code
                for path in ("/api/v1/health", "/api/v1/ready?slurm=false")
            ]
            after = (await api.get("/api/v1/services")).json()
            # The machine's own programs (curl, a page of localhost) still get in.
            made = await api.post(
                "/api/v1/services",
                content=CREATE,
                headers={"Content-Type": "application/json", "Origin": "http://localhost:8080"},
            )
            if made.status_code == 201:
                stopped = await api.delete(f"/api/v1/services/{made.json()['id']}")
                assert stopped.status_code == 200, stopped.text
    refused = [cross_site, no_origin, prompt, listing]
    assert [r.status_code for r in refused] == [403, 415, 415, 421], [r.text for r in refused]
    assert "Content-Type" in no_origin.json()["detail"]
    assert after == before  # no job was created
    assert probes == [200, 200]
    assert made.status_code == 201, made.text
    TIMINGS.append(
        f"browser attacks, {cluster.name}: cross-site text/plain POST {cross_site.status_code}, "
        f"without Origin {no_origin.status_code}, prompt {prompt.status_code}, rebound Host "
        f"{listing.status_code}; probes {probes}; JSON from localhost {made.status_code}"
    )


async def test_two_requests_sending_one_request_id_are_two_in_the_log(
    cluster: LocalCluster,
) -> None:
    with GatewayProcess(cluster) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as api:
            given = [
                (await api.get("/api/v1/recipes", headers={"X-Request-ID": "same-id"})).headers[
                    "x-request-id"
                ]
                for _ in range(2)
            ]

        async def logged() -> list[str]:
            lines = [json.loads(x) for x in gateway.log.read_text().splitlines() if x[:1] == "{"]
            return [
                x["request_id"]
                for x in lines
                if x.get("event") == "access" and x.get("client_request_id") == "same-id"
            ]

        in_log = await poll(logged, lambda ids: len(ids) == 2, timeout=10, interval=0.1)
    assert len(set(in_log)) == 2 and in_log == given, (in_log, given)
    TIMINGS.append(f"request ids, {cluster.name}: X-Request-ID same-id sent twice -> {in_log}")
