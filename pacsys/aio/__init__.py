"""Async side of pacsys: the AsyncBackend interface, its subscription handle, and the sync adapter."""

from pacsys.aio._adapter import SyncBackendAdapter, as_async
from pacsys.aio._backends import AsyncBackend
from pacsys.aio._context import caller_authorization
from pacsys.aio._subscription import AsyncSubscriptionHandle

__all__ = ["AsyncBackend", "AsyncSubscriptionHandle", "SyncBackendAdapter", "as_async", "caller_authorization"]
