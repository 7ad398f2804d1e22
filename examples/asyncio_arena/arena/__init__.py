"""Game logic of the asyncio arena: the only package hot patches may touch."""

__all__ = ["rules"]
