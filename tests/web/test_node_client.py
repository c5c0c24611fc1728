"""The TypeScript client generated from the protos (web/src/gen) calls the real services through the real
gateway from Node, over the same gRPC-Web transport a browser uses (web/tests/node-client.ts): a unary call, a
server stream that delivers a change made meanwhile, an error with its details decoded (and the same rules
checked client-side first), the order state machine's refusal, a deadline."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

from fabrica.config.v1 import config_service_pb2 as config_pb
from fabrica.production.v1 import production_service_pb2 as prod_pb

from .conftest import WebStack

WEB = Path(__file__).resolve().parents[2] / "web"
TSX = WEB / "node_modules" / ".bin" / "tsx"


async def _run_node_client(url: str, token: str) -> dict[str, dict[str, Any]]:
    assert shutil.which("node"), "Node.js (20+) is needed for the web client"
    assert TSX.exists(), f"{TSX} is missing: `make web-deps` (make test runs it) installs web/'s packages"
    proc = await asyncio.create_subprocess_exec(str(TSX), "tests/node-client.ts", url, cwd=WEB,
                                                env={**os.environ, "FABRICA_TOKEN": token},
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"node client failed ({proc.returncode}):\n{stderr.decode()}\n{stdout.decode()}"
    steps = [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]
    return {s.pop("step"): s for s in steps}


async def test_the_generated_typescript_client_through_the_gateway(
        authed_web_stack: tuple[WebStack, str]) -> None:
    web_stack, token = authed_web_stack
    steps = await _run_node_client(web_stack.url, token)
    assert list(steps) == ["anonymous", "unary", "setup", "stream", "invalid", "state", "deadline"]
    bearer = (("authorization", f"Bearer {token}"),)

    # Without a token the services refuse the call (the gateway adds none), with the reason decoded.
    anonymous = steps["anonymous"]
    assert anonymous["code"] == "Unauthenticated", anonymous
    assert anonymous["errorInfo"] and anonymous["errorInfo"]["reason"] == "TOKEN_MISSING", anonymous

    # Unary: the device profiles config serves, by name.
    direct = await web_stack.servers["config"].stub.ListDeviceProfiles(config_pb.ListDeviceProfilesRequest(),
                                                                       metadata=bearer)
    assert [p["id"] for p in steps["unary"]["profiles"]] == [p.id for p in direct.profiles]
    assert all(p["displayName"] for p in steps["unary"]["profiles"])

    # Server stream: a snapshot first, then the order created meanwhile, as production stored it.
    stream = steps["stream"]
    assert stream["first"]["snapshot"] is True and stream["first"]["orders"] == 0
    change = stream["change"]
    assert change["snapshot"] is False and int(change["revision"]) > int(stream["first"]["revision"])
    stored = (await web_stack.servers["production"].stub.GetOrder(prod_pb.GetOrderRequest(id=change["id"]),
                                                                  metadata=bearer)).order
    assert (change["number"], int(change["plannedQuantity"]), change["workCenterId"]) == \
        (stored.number, stored.planned_quantity, stored.work_center_id) == ("NODE-1", 5, "node-wc")

    # An invalid request: the client's own validation finds the same fields the server then names in its
    # BadRequest, and the ErrorInfo says why in machine terms.
    invalid = steps["invalid"]
    server = invalid["server"]
    assert server is not None and server["code"] == "InvalidArgument"
    server_says = sorted((v["field"], v["description"]) for v in server["fieldViolations"])
    client_says = sorted((v["field"], v["message"]) for v in invalid["client"])
    assert "plc.id" in dict(server_says) and server_says == client_says, (client_says, server_says)
    assert server["errorInfo"] and server["errorInfo"]["reason"] == "INVALID_ARGUMENT"

    # The state machine: starting a started order is refused with the reason in words.
    state = steps["state"]["server"]
    assert state is not None and state["code"] == "FailedPrecondition", state
    assert state["message"] and state["errorInfo"] and state["errorInfo"]["reason"]

    # The client's deadline ends the watch.
    assert steps["deadline"]["code"] == "DeadlineExceeded"
