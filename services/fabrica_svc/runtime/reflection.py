"""Server reflection that serves the contracts with their comments, so `grpcurl describe` explains them.

The generated ``*_pb2`` modules embed their file descriptors without source info (protoc leaves it out), so
reflection from them shows types without a word of what they mean: ``grpcurl describe
fabrica.config.v1.WordOrder`` would list WORD_ORDER_LITTLE_ENDIAN without saying that it means CDAB.
scripts/gen.sh therefore also writes ``gen/fabrica/descriptor_set.binpb``: every Fabrica proto file's
descriptor *with* its source info (``protoc --include_source_info``), committed with the rest of gen/.

`SourceInfoPool` answers reflection from the descriptors the process really runs (the default pool, filled
by the generated modules) and adds the comments of the committed set to a file only when the set describes
that file exactly as it runs (compared without source info and json names): a stale set can cost comments,
never misdescribe the API. Files the set does not hold (health, reflection, well-known types) are served as
they are.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool

log = logging.getLogger(__name__)

#: Where scripts/gen.sh writes the descriptor set, relative to the generated ``fabrica`` package.
DESCRIPTOR_SET_NAME = "descriptor_set.binpb"


def descriptor_set_path() -> Path:
    import fabrica  # the generated package (gen/fabrica)

    return Path(next(iter(fabrica.__path__))) / DESCRIPTOR_SET_NAME


def _without_json_names(proto: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """A copy without source info and json names (protoc writes json names into a descriptor set, the
    runtime's copy of a generated file has none)."""
    out = descriptor_pb2.FileDescriptorProto()
    out.CopyFrom(proto)
    out.ClearField("source_code_info")
    messages = list(out.message_type)
    for field in out.extension:
        field.ClearField("json_name")
    while messages:
        message = messages.pop()
        for field in (*message.field, *message.extension):
            field.ClearField("json_name")
        messages.extend(message.nested_type)
    return out


class _FileWithSource:
    """A FileDescriptor whose CopyToProto adds the source info (all the reflection servicer calls on it)."""

    def __init__(self, descriptor: Any, source: descriptor_pb2.SourceCodeInfo | None, pool: SourceInfoPool):
        self._descriptor = descriptor
        self._source = source
        self._pool = pool
        self.name = descriptor.name

    @property
    def dependencies(self) -> list[_FileWithSource]:
        return [self._pool.wrap(d) for d in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:  # noqa: N802 - protobuf's name
        self._descriptor.CopyToProto(proto)
        if self._source is not None:
            proto.source_code_info.CopyFrom(self._source)


class SourceInfoPool:
    """The lookups grpc_reflection makes of a DescriptorPool, answered from `pool` with the comments of the
    descriptor set at `path` (see the module docstring)."""

    def __init__(self, path: Path, pool: descriptor_pool.DescriptorPool | None = None):
        self._pool = pool or descriptor_pool.Default()
        self._stored: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        self._checked: dict[str, descriptor_pb2.SourceCodeInfo | None] = {}
        try:
            stored = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
        except (OSError, ValueError) as exc:  # reflection still works, without comments
            log.warning("no descriptor set with comments at %s (%s); reflection serves the contracts without them",
                        path, exc)
            return
        self._stored = {f.name: f for f in stored.file}

    def _source_of(self, descriptor: Any) -> descriptor_pb2.SourceCodeInfo | None:
        name = descriptor.name
        if name not in self._checked:
            stored = self._stored.get(name)
            source = None
            if stored is not None:
                live = descriptor_pb2.FileDescriptorProto()
                descriptor.CopyToProto(live)
                if _without_json_names(live) == _without_json_names(stored):
                    source = stored.source_code_info
                else:
                    log.warning("%s in the descriptor set differs from the running code; run `make gen`", name)
            self._checked[name] = source
        return self._checked[name]

    def wrap(self, descriptor: Any) -> _FileWithSource:
        return _FileWithSource(descriptor, self._source_of(descriptor), self)

    def FindFileByName(self, name: str) -> _FileWithSource:  # noqa: N802 - DescriptorPool's names
        return self.wrap(self._pool.FindFileByName(name))

    def FindFileContainingSymbol(self, symbol: str) -> _FileWithSource:  # noqa: N802
        return self.wrap(self._pool.FindFileContainingSymbol(symbol))

    def FindMessageTypeByName(self, name: str) -> Any:  # noqa: N802
        return self._pool.FindMessageTypeByName(name)

    def FindExtensionByNumber(self, message: Any, number: int) -> Any:  # noqa: N802
        return self._pool.FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message: Any) -> Any:  # noqa: N802
        return self._pool.FindAllExtensions(message)
