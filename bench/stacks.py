"""Envoy in front of the floor server (bench/floor.py), supervised like the dev stack.

The floor path must run the very Envoy config the extproc path runs, ext_proc filter, processing modes
and all, with only the processor behind the ``extproc`` cluster changed: ``render_envoy_config`` does
that given the floor's port, and this stack starts Envoy on the result as ``Stack`` does for extproc.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from extproc.devenv import Process, Stack, render_envoy_config

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class FloorStack(Stack):
    """Envoy with the repo's config, its ext_proc filter pointed at the floor server. ``upstream`` is
    required (the model the other paths front); the floor is stopped as the stack's extproc is."""

    def _start(self, timeout: float) -> None:
        if self.upstream is None:
            raise ValueError("the floor stack fronts an upstream of the other paths: give upstream")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, "-m", "bench.floor", "--port", str(self.extproc_port)]
        floor = Process("floor", argv, self._sink, env)
        self.processes["extproc"] = floor  # Stack.stop stops it after Envoy, as it does extproc
        self.extproc_port = int(floor.wait_ready(timeout)["grpc"].rpartition(":")[2])
        base = yaml.safe_load(self.envoy_config.read_text(encoding="utf-8"))
        config = render_envoy_config(
            base,
            listen_port=self.envoy_port,
            admin_port=self.envoy_admin_port,
            extproc_port=self.extproc_port,
            upstream=self.upstream,
        )
        self.start_envoy(config, timeout)
