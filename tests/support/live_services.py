"""Services created, waited for and prompted through a live gateway's HTTP API."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.polling import poll


class Services:
    """Creates services through the API and stops whatever is left at the end."""

    def __init__(self, api: httpx.AsyncClient) -> None:
        self.api = api
        self.ids: list[str] = []

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.api.post("/api/v1/services", json=body)
        assert response.status_code == 201, response.text
        service: dict[str, Any] = response.json()
        self.ids.append(service["id"])
        return service

    async def http(self, **env: str) -> dict[str, Any]:
        return await self.create({"recipe_name": "testing/http", "config": {"environment": env}})

    async def status(self, service_id: str) -> dict[str, Any]:
        response = await self.api.get(f"/api/v1/services/{service_id}/status")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def wait(self, service_id: str, *statuses: str, timeout: float = 90) -> dict[str, Any]:
        return await poll(
            lambda: self.status(service_id),
            lambda s: s["status"] in statuses,
            timeout=timeout,
            what=f"service {service_id} in {statuses}",
        )

    async def cleanup(self) -> None:
        for service_id in self.ids:
            await self.api.delete(f"/api/v1/services/{service_id}")


async def running_stub(api: httpx.AsyncClient) -> str:
    """The id of a new, running service of the OpenAI-shaped stub recipe
    (tests/recipes/testing/openai-stub)."""
    created = await api.post(
        "/api/v1/services", json={"recipe_name": "testing/openai-stub"}
    )  # fmt: skip
    assert created.status_code == 201, created.text
    sid: str = created.json()["id"]
    await poll(
        lambda: api.get(f"/api/v1/services/{sid}/status"),
        lambda r: r.json()["status"] == "running",
        timeout=60,
    )
    return sid


async def prompt(api: httpx.AsyncClient, sid: str, stream: bool = False) -> httpx.Response:
    """A prompt to the stub service ``sid``; a 200 must be the stub's whole answer."""
    body: dict[str, Any] = {"prompt": "hi", "max_tokens": 4, "stream": stream}
    response = await api.post(f"/api/v1/vllm/{sid}/prompt", json=body)
    if response.status_code == 200:
        if stream:
            assert response.text.rstrip().endswith("data: [DONE]"), response.text
        else:
            assert response.json()["response"] == " tok" * 4
    return response
