"""memsvc.langgraph: LangGraph persistence through memsvc.

:class:`MemsvcSaver` is a LangGraph checkpointer (``BaseCheckpointSaver``) that keeps
checkpoints in memsvc over gRPC, so every agent in a pod, in any language, shares
one store with retention, a writer fence and tenancy. Needs
``pip install 'memsvc[langgraph]'``. See docs/langgraph.md.
"""

from memsvc.langgraph._saver import MemsvcSaver, SessionLink

__all__ = ["MemsvcSaver", "SessionLink"]
