"""Staging of function definitions (added, changed, their live closures): the stager's
``FunctionStaging`` part, mixed into :class:`~hotfleet.staging.stager.Stager`.
"""

from __future__ import annotations

import gc
import types
from typing import Any, Dict, List, Optional, Tuple

from .. import diff as D
from ..errors import StagingRefusal
from ..snapshot import MISSING
from ..swap import find_code
from .actions import ExecAction, SwapAction
from .class_actions import ClassExecAction
from .batch import def_doc
from .common import exec_in_class, strip_decorators
from .model import ModuleCtx, Scope


class FunctionStaging:
    """Stages function definitions; mixed into ``Stager`` (uses its compile helpers)."""

    # -- functions -----------------------------------------------------------

    def _stage_def(self, ctx: ModuleCtx, old: Optional[D.Stmt], new: D.Stmt, scope: Scope) -> None:
        """A def at module or class level: added (``old`` None) or changed."""
        if old is None:
            self._stage_added_def(ctx, new, scope)
        else:
            self._stage_changed_def(ctx, old, new, scope)

    def _stage_added_def(self, ctx: ModuleCtx, new: D.Stmt, scope: Scope) -> None:
        """A new function: body validated now, the decorated def runs at commit."""
        stage, plan = ctx.stage, ctx.stage.plan
        node = new.node
        code = self._compile_stmt(strip_decorators(node), scope, ctx.filename, ctx.flags)
        staged = self._exec_def(code, node.name, scope)  # type: ignore[attr-defined]
        self._check_heads(node, scope, scope.ns)
        full = self._compile_stmt(node, scope, ctx.filename, ctx.flags)
        if scope.is_class:
            assert scope.cls is not None and scope.ns is not None
            stage.actions.append(ClassExecAction(stage.name, scope.qual(new.name), new.first, scope.cls, full, ctx.g, (new.name,), "added"))
            scope.ns[new.name] = staged
            ctx.class_gains.setdefault(scope.cls, set()).add(new.name)
        else:
            stage.actions.append(ExecAction(stage.name, new.name, new.first, full, ctx.g, "added"))
            scope.globals[new.name] = staged
        plan.add("added", scope.qual(new.name), new.first, "function" + (" (decorators run at commit)" if node.decorator_list else ""))  # type: ignore[attr-defined]

    def _exec_def(self, code: types.CodeType, name: str, scope: Scope) -> types.FunctionType:
        if scope.is_class:
            assert scope.ns is not None
            previous = scope.ns.get(name, MISSING)
            exec_in_class(code, scope.globals, scope.ns, scope.cls)
            staged = scope.ns[name]
            # a changed method keeps its live binding for later staged statements
            if previous is MISSING:
                scope.ns.pop(name, None)
            else:
                scope.ns[name] = previous
        else:
            tmp: Dict[str, Any] = {}
            exec(code, scope.globals, tmp)
            staged = tmp[name]
        if not isinstance(staged, types.FunctionType):
            raise StagingRefusal(f"definition of {name} did not produce a function", None, "fix the patch source")
        return staged

    def _stage_changed_def(self, ctx: ModuleCtx, old: D.Stmt, new: D.Stmt, scope: Scope) -> None:
        """A changed function: swap the new code into every live object the old def made."""
        stage, plan = ctx.stage, ctx.stage.plan
        onode, nnode = old.node, new.node
        qual = scope.qual(new.name)
        batched = ctx.def_codes.get(id(nnode))
        code: Optional[types.CodeType] = None
        if batched is not None:
            # only the code changes: compiled with the module's other changed defs, nothing run
            new_code = batched
            new_doc = def_doc(new_code, scope.globals)
            new_qualname: str = getattr(new_code, "co_qualname", qual)
        else:
            code = self._compile_stmt(strip_decorators(nnode), scope, ctx.filename, ctx.flags)
            staged = self._exec_def(code, nnode.name, scope)  # type: ignore[attr-defined]
            new_code, new_doc, new_qualname = staged.__code__, staged.__doc__, staged.__qualname__
        redecorated = D.decorators_dump(onode) != D.decorators_dump(nnode)
        if redecorated:
            self._check_heads(nnode, scope, scope.ns)
        targets = ctx.index.find(onode.name, old.first)  # type: ignore[attr-defined]
        if not targets and not redecorated:
            plan.add("conflict", qual, new.first, "no live function matches the recorded definition (rebound at run time?): live object kept")
            return
        swap_targets: List[Tuple[types.FunctionType, types.CodeType]] = []
        rebind = redecorated
        for fn in targets:
            if fn.__code__.co_freevars == new_code.co_freevars:
                swap_targets.append((fn, fn.__code__))
                continue
            differ = set(fn.__code__.co_freevars) ^ set(new_code.co_freevars)
            if scope.is_class and differ <= {"__class__"}:
                # Gaining or losing zero-argument super(): the closure of the live
                # function cannot change, so the class attribute is rebound to a
                # new function object whose __class__ cell is the live class.
                rebind = True
                plan.add("note", qual, new.first, "zero-argument super()/__class__ use changed: the class attribute is rebound to a new function object; references to the old function object keep the old code")
                continue
            raise StagingRefusal(
                f"closure shape of {qual} changed (free variables {fn.__code__.co_freevars} -> {new_code.co_freevars}); live cells cannot be carried",
                new.first,
                "keep the free variable names of the closure, or restart",
            )
        closures = self._stage_closures(ctx, old, new, new_code, [fn for fn, _ in swap_targets] + [t for t in targets])
        keep_defaults = D.args_dump(onode, "defaults") == D.args_dump(nnode, "defaults")
        keep_kw = D.args_dump(onode, "kw") == D.args_dump(nnode, "kw")
        keep_ann = D.annotations_dump(onode) == D.annotations_dump(nnode)
        needs_exec = not (keep_defaults and keep_kw and keep_ann)
        caches: List[Any] = []
        for fn, _ in swap_targets:
            for w in ctx.index.caches_of(fn):
                if w not in caches:
                    caches.append(w)
        if swap_targets or closures:
            stage.actions.append(
                SwapAction(
                    stage.name,
                    qual,
                    new.first,
                    nnode.name,  # type: ignore[attr-defined]
                    swap_targets,
                    new_code,
                    new_doc,
                    new_qualname,
                    code if needs_exec else None,
                    ctx.g,
                    scope.cls,
                    keep_defaults,
                    keep_kw,
                    keep_ann,
                    closures,
                    caches,
                )
            )
            detail = "code swapped in place"
            if caches:
                detail += "; caches cleared"
            plan.add("function", qual, new.first, detail, len(swap_targets))
            for fn, _o, _n in closures:
                plan.add("closure", fn.__qualname__, new.first, "live closure runs the new code (cells kept)")
        if rebind:
            full = self._compile_stmt(nnode, scope, ctx.filename, ctx.flags)
            if scope.is_class:
                assert scope.cls is not None
                stage.actions.append(ClassExecAction(stage.name, qual, new.first, scope.cls, full, ctx.g, (new.name,), "rebind"))
            else:
                stage.actions.append(ExecAction(stage.name, qual, new.first, full, ctx.g, "rebind"))
            plan.add("rerun", qual, new.first, "decorators changed: definition re-run at commit, name rebound" if redecorated else "rebound")
        if scope.is_class:
            ctx.mark_updated(scope.cls)

    def _stage_closures(
        self, ctx: ModuleCtx, old: D.Stmt, new: D.Stmt, new_code: types.CodeType, exclude: List[types.FunctionType]
    ) -> List[Tuple[types.FunctionType, types.CodeType, types.CodeType]]:
        """Live closures created from nested definitions of a changed function."""
        out: List[Tuple[types.FunctionType, types.CodeType, types.CodeType]] = []
        if exclude and not any(isinstance(c, types.CodeType) for f in exclude for c in f.__code__.co_consts):
            # the live function's code defines nothing nested: no live closure can come from it
            return out
        old_paths = D.nested_path(old.node)
        new_paths = D.nested_path(new.node)
        new_by_path = {path: node for node in D.nested_functions(new.node) for path in [new_paths.get(id(node))] if path}
        excluded = {id(f) for f in exclude}
        nested = D.nested_functions(old.node)
        # closures live wherever the game stored them (a callback list, another module's
        # registry, a game object): found by their code objects, one heap walk per function
        anywhere = _live_functions_of(exclude) if nested else {}
        if anywhere:
            ctx.stage.plan.add("note", old.name, old.first, "live closures looked up by a heap walk (objects frozen by gc.freeze are not seen)")
        for onode in nested:
            path = old_paths.get(id(onode))
            key = (D.node_code_name(onode), D.node_first_line(onode))
            live = [f for f in ctx.index.find(*key) if id(f) not in excluded]
            seen = {id(f) for f in live}
            live.extend(f for f in anywhere.get(key, ()) if id(f) not in excluded and id(f) not in seen)
            if not live or path is None:
                continue
            nnode = new_by_path.get(path)
            ncode = find_code(new_code, D.node_code_name(nnode), D.node_first_line(nnode)) if nnode is not None else None
            if nnode is None or ncode is None:
                ctx.stage.plan.add("note", live[0].__qualname__, old.first, "its definition was removed: live closures keep the old code")
                continue
            for fn in live:
                if fn.__code__.co_freevars != ncode.co_freevars:
                    raise StagingRefusal(
                        f"live closure {fn.__qualname__} captures {fn.__code__.co_freevars} but the new definition uses {ncode.co_freevars}; running it would read the wrong cells",
                        D.node_first_line(nnode),
                        "keep the names of the variables the closure captures, or restart",
                    )
                if D.signature_dump(onode) != D.signature_dump(nnode):
                    raise StagingRefusal(
                        f"parameters of live closure {fn.__qualname__} changed; its defaults were bound when it was created",
                        D.node_first_line(nnode),
                        "keep the closure's parameters, or restart",
                    )
                out.append((fn, fn.__code__, ncode))
        return out


def _live_functions_of(outer: List[types.FunctionType]) -> Dict[Tuple[str, int], List[types.FunctionType]]:
    """Live function objects anywhere in the heap whose code is nested in the code of one
    of ``outer``, by (name, first line)."""
    codes: Dict[int, types.CodeType] = {}
    todo = [f.__code__ for f in outer]
    while todo:
        code = todo.pop()
        for const in code.co_consts:
            if isinstance(const, types.CodeType) and id(const) not in codes:
                codes[id(const)] = const
                todo.append(const)
    out: Dict[Tuple[str, int], List[types.FunctionType]] = {}
    if not codes:
        return out
    for ref in gc.get_referrers(*codes.values()):
        if isinstance(ref, types.FunctionType) and id(ref.__code__) in codes:
            out.setdefault((ref.__code__.co_name, ref.__code__.co_firstlineno), []).append(ref)
    return out
