"""Who is calling: request-scoped facts a backend may need, carried by a ContextVar.

The servicer sets `caller_authorization` to the caller's `authorization` metadata
before it calls the backend (the worker pool carries it to the worker, which sets it
again there), so a forwarding backend such as `grpc://` can pass the caller's bearer
token on. Backends that do not care never see it.
"""

from contextvars import ContextVar

caller_authorization: ContextVar[str | None] = ContextVar("pacsys_caller_authorization", default=None)
