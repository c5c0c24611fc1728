"""The demo plant `fabrica run` sets up: what it can with the services in this build."""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

from .runtime.server import ServiceHost

log = logging.getLogger("fabrica.demo")


async def start_demo(stack: contextlib.AsyncExitStack, hosts: dict[str, ServiceHost],
                     args: argparse.Namespace, data_dir: Path) -> list[str]:
    """Start the demo parts the running services can use; returns lines for the banner."""
    if args.no_demo:
        return []
    lines: list[str] = []
    return lines
