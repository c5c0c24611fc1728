"""The config service: PLC definitions, device profiles, and their push to collectors."""
