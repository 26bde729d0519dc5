"""memsvc: the memory sidecar for AI agents, served over gRPC."""

__version__ = "0.1.0"
