"""What ops see from the terminal: `grpcurl describe` explains the contracts with their comments (reflection
serves the descriptors with source info), and a second `fabrica serve` on a taken port says which address and
which variable moves it, for the gRPC port and for the metrics port."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import pytest
from fabrica.config.v1 import plc_pb2
from google.protobuf import descriptor_pb2

from fabrica_svc.runtime.reflection import SourceInfoPool, descriptor_set_path
from in_process import Servers, settings_for
from procs import ServiceProcess

GRPCURL = shutil.which("grpcurl", path=str(Path(os.sys.executable).parent)) or "grpcurl"
PLC_PROTO = Path(__file__).parents[2] / "protos" / "fabrica" / "config" / "v1" / "plc.proto"


def _comment_above(proto: Path, line_start: str) -> str:
    """The comment line right above the first line of `proto` that starts (after indentation) with `line_start`."""
    lines = proto.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip().startswith(line_start))
    assert lines[i - 1].strip().startswith("//"), f"no comment above {line_start!r} in {proto}"
    return lines[i - 1].strip()


async def test_grpcurl_describe_shows_what_the_enums_and_fields_mean(database_url: str, servers: Servers) -> None:
    server = await servers.start("config", settings_for("config", database_url=database_url))
    expected = {
        "fabrica.config.v1.WordOrder": [_comment_above(PLC_PROTO, "enum WordOrder"),
                                        _comment_above(PLC_PROTO, "WORD_ORDER_LITTLE_ENDIAN = 2"),
                                        _comment_above(PLC_PROTO, "WORD_ORDER_BIG_ENDIAN = 1")],
        "fabrica.config.v1.ModbusTcpConnection": [_comment_above(PLC_PROTO, "uint32 unit_id = 3")],
    }
    for symbol, comments in expected.items():
        # Not subprocess.run: the server runs on this test's event loop, which must keep running meanwhile.
        proc = await asyncio.create_subprocess_exec(GRPCURL, "-plaintext", server.address, "describe", symbol,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        for comment in comments:
            assert comment in out.decode(), (comment, out.decode())


def test_a_descriptor_set_that_differs_from_the_running_code_costs_the_comments_not_the_truth(
        tmp_path: Path) -> None:
    stored = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_path().read_bytes())
    plc_file = next(f for f in stored.file if f.name == "fabrica/config/v1/plc.proto")
    assert plc_file.source_code_info.location, "the committed set carries the comments"
    served = descriptor_pb2.FileDescriptorProto()
    SourceInfoPool(descriptor_set_path()).FindFileContainingSymbol("fabrica.config.v1.WordOrder").CopyToProto(served)
    assert served.source_code_info == plc_file.source_code_info

    next(e for e in plc_file.enum_type if e.name == "WordOrder").value[2].name = "WORD_ORDER_SOMETHING_ELSE"
    stale = tmp_path / "stale.binpb"
    stale.write_bytes(stored.SerializeToString())
    served = descriptor_pb2.FileDescriptorProto()
    SourceInfoPool(stale).FindFileContainingSymbol("fabrica.config.v1.WordOrder").CopyToProto(served)
    live = descriptor_pb2.FileDescriptorProto()
    plc_pb2.DESCRIPTOR.CopyToProto(live)
    assert served == live and not served.HasField("source_code_info")  # what runs, without comments

    missing = descriptor_pb2.FileDescriptorProto()
    SourceInfoPool(tmp_path / "none.binpb").FindFileByName("fabrica/config/v1/plc.proto").CopyToProto(missing)
    assert missing == live


def _second(tmp_path: Path, database_url: str, name: str, port: int, **env: str) -> str:
    """Start a second `fabrica serve config`; it must exit with 1. Returns its one line of complaint."""
    second = ServiceProcess("config", {"DATABASE_URL": database_url, **env}, tmp_path / f"{name}.log", port=port)
    with pytest.raises(AssertionError, match="exited with 1 before listening"):
        second.start(timeout=60)
    lines = [line for line in second.log().splitlines() if line.startswith("fabrica: ")]
    assert len(lines) == 1, second.log()
    return lines[0]


def test_a_second_service_on_a_taken_port_names_the_address_and_the_variable(
        database_url: str, tmp_path: Path) -> None:
    first = ServiceProcess("config", {"DATABASE_URL": database_url, "FABRICA_METRICS_PORT": "0"},
                           tmp_path / "first.log").start()
    try:
        assert first.metrics_port
        grpc_taken = _second(tmp_path, database_url, "grpc", first.port)
        assert grpc_taken.startswith(f"fabrica: cannot listen on 127.0.0.1:{first.port} (the gRPC port of config)")
        assert "set FABRICA_PORT to another port" in grpc_taken

        metrics_taken = _second(tmp_path, database_url, "metrics", 0, FABRICA_METRICS_PORT=str(first.metrics_port))
        assert metrics_taken.startswith(
            f"fabrica: cannot serve metrics on 127.0.0.1:{first.metrics_port} (the metrics port of config): "
            "Address already in use")
        assert "set FABRICA_METRICS_PORT to another port" in metrics_taken
        assert not re.search(r"Errno|Traceback", metrics_taken + grpc_taken)
    finally:
        first.kill()
