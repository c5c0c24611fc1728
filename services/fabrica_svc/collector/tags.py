"""From the contract's Tag to a compiled decoder, and from decoded values to the contract's Value.

The conversion (`tag_spec`) and the rules (`tag_violations`) are the shared PLC/tag model's
(:mod:`fabrica_svc.plcmodel`), the same the config service checks a PLC with; pollers and PreviewDecode go
through the functions here.
"""

from __future__ import annotations

from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import plc_pb2

from ..plcmodel import plc as model
from ..plcmodel.plc import tag_spec
from ..plcmodel.spec import DataType, TagSpec
from ..runtime.errors import FieldViolation
from .decode import Value, make_decoder

__all__ = ["compiled", "tag_spec", "tag_violations", "to_value", "value_kind"]

_SIGNED = frozenset({DataType.INT16, DataType.INT32, DataType.INT64})


def tag_violations(tag: plc_pb2.Tag, plc: plc_pb2.Plc, prefix: str = "tag", tag_id: int | None = None) -> list[FieldViolation]:
    """Why `tag` cannot be read from `plc`, as field violations under `prefix` (empty when it can).

    The tag's id is checked too (`tag_id` overrides it): a tag without one cannot be compiled.
    """
    return model.tag_violations(tag, prefix, model.is_s7(plc), tag.id if tag_id is None else tag_id)


def compiled(tag: plc_pb2.Tag, tag_id: int | None = None) -> TagSpec:
    """tag_spec, plus the full validation make_decoder does (raises TagSpecError listing every problem)."""
    spec = tag_spec(tag, tag_id)
    make_decoder(spec)
    return spec


def value_kind(spec: TagSpec) -> str:
    """Which Value field a decoded value of `spec` goes into."""
    if spec.data_type is DataType.BOOL:
        return "bool_value"
    if spec.data_type is DataType.STRING:
        return "string_value"
    if spec.data_type in (DataType.FLOAT32, DataType.FLOAT64) or spec.is_scaled:
        return "double_value"
    return "int_value" if spec.data_type in _SIGNED else "uint_value"


def to_value(kind: str, value: Value) -> reading_pb2.Value:
    """A decoded value as the contract's Value (`kind` from `value_kind`)."""
    if kind == "double_value":
        return reading_pb2.Value(double_value=float(value))
    return reading_pb2.Value(**{kind: value})
