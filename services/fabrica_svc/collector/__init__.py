"""The collector: polls PLCs over Modbus and S7, decodes tag values and ships them to ingest as readings."""
