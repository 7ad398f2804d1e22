"""Taking a committed patch off the stack (``rollout revert``): which sources to restore.

A revert runs no code the process was not already given: for each module the patch
replaced, the source to restore is the one the patch's own prepare was made against
(the nearest lower patch touching the module, else the module's base source as the
process loaded it). That source is staged as an ordinary transaction (same stager,
same commit, same exact rollback); its commit takes the patch's entry off the stack.

Allowed on the top of the stack, or deeper when the patches above touch none of the
patch's modules (their sources sit on top of the ones it would restore otherwise).
Modules the patch *added* are left loaded: the restored code no longer imports them,
and a process started later never has them. Instance data the patch's hooks migrated
has no inverse: a revert restores code, not data (the restored source's own hooks run,
as in any commit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple

from .errors import PrepareError

if TYPE_CHECKING:  # annotations only
    from .runtime import StackEntry
    from .snapshot import Journal
    from .transaction import CommitReport, Transaction

__all__ = ["RevertRecord", "revert_id", "revert_sources", "blocking"]

#: Prefix of a revert transaction's id (the reverted patch's id follows).
PREFIX = "revert-"


def revert_id(patch_id: str) -> str:
    """The transaction id of the revert of ``patch_id``."""
    return PREFIX + patch_id


def blocking(stack: Sequence["StackEntry"], index: int) -> List[str]:
    """Ids of the patches above ``stack[index]`` that touch one of its modules."""
    mine = set(stack[index].digests)
    return [e.id for e in stack[index + 1:] if mine & set(e.digests)]


def revert_sources(stack: Sequence["StackEntry"], patch_id: str) -> Tuple[Dict[str, str], List[str]]:
    """(module -> source to restore, modules the patch added) for reverting ``patch_id``.

    Raises :class:`PrepareError` when the patch is not on the stack, when patches above
    it touch its modules (naming them), or when it only added modules (nothing to stage).
    """
    index = next((i for i, e in enumerate(stack) if e.id == patch_id), None)
    if index is None:
        raise PrepareError(f"patch {patch_id} is not on this process's patch stack; nothing to revert")
    above = blocking(stack, index)
    if above:
        raise PrepareError(
            f"patch {patch_id} cannot be reverted: patches above it touch its modules ({', '.join(above)})",
            hint="revert those first (newest first)",
        )
    sources: Dict[str, str] = {}
    added: List[str] = []
    for stage in stack[index].txn.stages:
        if stage.base is None:
            added.append(stage.name)
        else:
            sources[stage.name] = stage.base.text
    if not sources:
        raise PrepareError(f"patch {patch_id} only added modules ({', '.join(added)}); there is no source to restore")
    return sources, sorted(added)


@dataclass
class RevertRecord:
    """A committed revert: what its commit took off the stack, and how to undo it exactly."""

    index: int
    entry: "StackEntry"
    txn: "Transaction"
    journal: "Journal"
    report: "CommitReport"

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able form."""
        return {"reverted": self.entry.id, "position": self.index, "report": self.report.to_dict()}
