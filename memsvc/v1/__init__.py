"""Generated protobuf and gRPC code for the memsvc.v1 contract (do not edit).

Regenerate with ``make proto`` after changing ``proto/memsvc/v1/*.proto``.
"""
