"""The real app served by uvicorn as in production (uvloop, httptools), its
running services given instead of asked of Slurm: for tests that watch a
gateway process (its memory) in front of real upstream servers on 127.0.0.1.

    RELAY_SERVICES='[["1", "m", "http://127.0.0.1:9000"]]' GATEWAY_...=... \\
        python -m tests.support.relay_server PORT

Each service is ``[id, model, url]``; the settings are the GATEWAY_ variables.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from typing import cast

import uvicorn
from litestar import Litestar

from gateway.app import create_app, served
from gateway.core.errors import NotFound
from gateway.core.principal import Principal
from gateway.core.services import Service, ServiceManager
from gateway.proxy.prompts import Prompting
from gateway.settings import load_settings
from tests.support.services import router, service


class RunningServices:
    """What the prompt route asks of ServiceManager: a running service by id."""

    def __init__(self, *services: Service) -> None:
        self.services = {s.id: s for s in services}

    async def running(
        self, service_id: str, principal: Principal, *, kind: str | None = None
    ) -> Service:
        if service_id not in self.services:
            raise NotFound(f"no service {service_id}")
        return self.services[service_id]


def given(app: Litestar, services: list[Service]) -> None:
    """``services`` as the front door's and the prompt route's, once started."""

    async def swap(app: Litestar) -> None:
        provided = app.state.provided
        vllm = provided.vllm
        # The app's front door (its settings) with these services.
        provided.front_door = replace(provided.front_door, router=router(*services))
        provided.prompting = Prompting(
            services=cast(ServiceManager, RunningServices(*services)), vllm=vllm
        )

    app.on_startup.append(swap)


def main() -> None:
    port = int(sys.argv[1])
    settings = load_settings()
    app = create_app(settings)
    services = [
        service(sid, model, url=url) for sid, model, url in json.loads(os.environ["RELAY_SERVICES"])
    ]
    given(app, services)
    uvicorn.run(
        served(app, settings),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
