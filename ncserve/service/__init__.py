"""The ncserve metrics service: gRPC API, aggregator, SQLite store, Prometheus exporter.

Start one in-process (tests, the trainer's embedded service) with
``start_server(ServerConfig(...))``; ``ncserve serve`` is the same from the command line.
"""

from ncserve.service.server import ServerConfig, ServerHandle, start_server

__all__ = ["ServerConfig", "ServerHandle", "start_server"]
