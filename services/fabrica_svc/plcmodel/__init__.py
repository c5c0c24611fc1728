"""The PLC/tag model shared by the config service and the collector: one owner for the tag rules.

``spec`` is the tag model in plain Python (:class:`~.spec.TagSpec`, its enums numbered by the contract,
register and byte counts, :func:`~.spec.validate_spec`); ``plc`` applies it to the contract's ``Plc`` and
``Tag`` messages (conversion, field violations with real paths, default ports and poll groups). Config
accepts a PLC only if :func:`~.plc.plc_violations` is empty; the collector compiles a tag only if
:func:`~.plc.tag_violations` is empty, and the first is a superset of the second, so what config accepts the
collector can poll. Generated protos only: no gRPC, no SQL.
"""
