"""Fabrica services: config, collector, ingest and production, and their shared runtime."""
