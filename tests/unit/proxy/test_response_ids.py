"""Response ids that say which service holds the response
(gateway/proxy/response_ids.py)."""

from __future__ import annotations

import json

from gateway.proxy.response_ids import holder, new_id, stamped


def test_an_id_names_its_service_and_no_other_id_names_one() -> None:
    made = new_id("15154")
    assert holder(made) == "15154"
    assert made != new_id("15154")  # unguessable from the service
    for other in (
        "resp_0d2f4a",  # vLLM's own
        "resp_15154_abc",
        "resp__" + "0" * 32,
        "resp_15154_" + "0" * 33,
        "resp_a_b_" + "0" * 32,
        "chatcmpl-1",
        "",
    ):
        assert holder(other) is None, other


def test_the_gateways_request_id_wins_over_the_clients() -> None:
    sent = b'{"model": "m", "input": "hi", "request_id": "mine"}  \n'
    body = json.loads(stamped(sent, "resp_1_" + "a" * 32))
    assert body == {"model": "m", "input": "hi", "request_id": "resp_1_" + "a" * 32}
    assert json.loads(stamped(b"{ }", "resp_2_" + "b" * 32)) == {"request_id": "resp_2_" + "b" * 32}
    # Named again (a retry on another service): the last one counts.
    again = stamped(stamped(sent, "resp_1_" + "a" * 32), "resp_3_" + "c" * 32)
    assert json.loads(again)["request_id"] == "resp_3_" + "c" * 32
