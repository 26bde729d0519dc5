"""The gRPC layer: servicers and the interceptor that maps errors to statuses."""

from memsvc.api._errors import ERROR_DOMAIN, ErrorInterceptor, to_rpc_status
from memsvc.api._working_memory import WorkingMemoryServicer

__all__ = ["ERROR_DOMAIN", "ErrorInterceptor", "WorkingMemoryServicer", "to_rpc_status"]
