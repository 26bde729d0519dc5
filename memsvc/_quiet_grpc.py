"""Imported by the command line before anything imports grpc.

gRPC's C core logs to stderr in a format of its own (a line for each failed TLS
handshake, at its default level), which breaks the one-JSON-object-per-line log and
says nothing memsvc does not report itself. It reads GRPC_VERBOSITY once, when grpc
is first imported: errors only, unless the environment sets it.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
