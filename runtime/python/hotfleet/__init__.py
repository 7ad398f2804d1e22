"""hotfleet: transactional, in-place hot patching of a live Python game server.

Three lines in a game server::

    import hotfleet
    rt = hotfleet.Runtime(packages=["zone"])
    rt.connect()                  # to the local hotfleet agent
    ...
    rt.safe_point()               # once per tick, on the game thread

See ``runtime/python/README.md`` for the semantics.
"""

from __future__ import annotations

from .errors import CommitError, HotfleetError, PrepareError, RollbackError
from .loops import SafePointHandle, asyncio_safe_point, threadsafe_scheduler
from .plan import Plan
from .runtime import RollbackReport, Runtime, StackEntry
from .transaction import CommitReport, Transaction

__version__ = "0.1.0"

__all__ = [
    "Runtime",
    "Transaction",
    "Plan",
    "CommitReport",
    "RollbackReport",
    "StackEntry",
    "HotfleetError",
    "PrepareError",
    "CommitError",
    "RollbackError",
    "asyncio_safe_point",
    "threadsafe_scheduler",
    "SafePointHandle",
    "__version__",
]
