"""Game logic of the example MMO zone server.

Everything a hot patch may change lives in this package: the runtime is created with
``packages=["zone"]``, so only ``zone`` and its submodules can be patched. The network
loop (``server.py``) stays outside it on purpose: it is plumbing, not game logic.
"""

__all__ = ["combat", "inventory", "players", "protocol", "world"]
