"""Run the gateway with uvicorn (uvloop and httptools when installed)."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import uvicorn

from embedq.common import tracing
from embedq.common.heap import freeze_startup_heap
from embedq.producer.gateway.app import create_app
from embedq.producer.gateway.config import GatewayConfig

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A stop signal is how a gateway normally ends: drain, then exit 0 like the
        # worker does (uvicorn would re-raise the signal and exit -15).
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def run_gateway(config: GatewayConfig) -> None:
    tracing.configure_from_env("embedq-gateway")
    app = create_app(config)
    server = _Server(
        uvicorn.Config(
            app,
            host=config.hostname,
            port=config.port,
            loop="auto",
            http="auto",
            access_log=False,
            log_config=None,
            # Slow clients must not hold connections forever.
            timeout_keep_alive=30,
            timeout_graceful_shutdown=30,
        )
    )
    freeze_startup_heap()
    try:
        server.run()
    finally:
        tracing.shutdown()
