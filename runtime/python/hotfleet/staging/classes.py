"""Staging of changed class bodies and dataclasses: the stager's ``ClassStaging`` part,
mixed into :class:`~hotfleet.staging.stager.Stager`.
"""

from __future__ import annotations

import abc
import ast
import dataclasses
import enum
from typing import Any, Dict, List, Optional, Set, cast

from .. import diff as D
from ..errors import StagingRefusal
from ..snapshot import MISSING, class_get, same_value
from ..swap import resolve_class
from .class_actions import AbstractsAction, AnnotationsAction, ClassExecAction, DataclassRegenAction, DocAction, class_namespace, dataclass_regenerate
from .common import Pending, exec_in_class, annotation_only, describe, error_line, literal_bindings, strip_decorators
from .data_actions import DataAction, RemoveAction
from .model import ModuleCtx, Scope


class ClassStaging:
    """Stages changed class bodies and dataclasses; mixed into ``Stager``."""

    # -- classes -------------------------------------------------------------

    def _stage_changed_class(
        self, ctx: ModuleCtx, old: D.Stmt, new: D.Stmt, chain: List[ast.ClassDef], globals_: Dict[str, Any]
    ) -> None:
        stage, plan = ctx.stage, ctx.stage.plan
        onode: ast.ClassDef = old.node  # type: ignore[assignment]
        nnode: ast.ClassDef = new.node  # type: ignore[assignment]
        names = [c.name for c in chain]
        qual = ".".join(names)
        cls = resolve_class(ctx.live, names)
        if cls is None:
            raise StagingRefusal(f"live {qual} is not the class the recorded source defines (rebound at run time?)", new.first, "restart to change it")
        if [ast.dump(b) for b in onode.bases] != [ast.dump(b) for b in nnode.bases] or [ast.dump(k) for k in onode.keywords] != [
            ast.dump(k) for k in nnode.keywords
        ]:
            raise StagingRefusal(f"bases or metaclass of {qual} changed; a live class cannot change them in place", new.first, "keep bases and metaclass, or restart")
        if D.decorators_dump(onode) != D.decorators_dump(nnode):
            raise StagingRefusal(f"class decorators of {qual} changed; decorators cannot be re-applied to a live class", new.first, "keep the class decorators, or restart")
        is_enum = isinstance(cls, enum.EnumMeta)
        is_namedtuple = issubclass(cls, tuple) and "_fields" in cls.__dict__
        is_protocol = bool(cls.__dict__.get("_is_protocol", False))
        is_dataclass = "__dataclass_fields__" in cls.__dict__
        _old_body, new_body, body = ctx.class_diff(old, new)
        ns = class_namespace(cls)
        scope = Scope(globals_, chain, cls, ns)
        if body.changed():
            ctx.mark_updated(cls)
            plan.add("class", qual, new.first, "class dict updated in place")
        field_changes = False
        sync_fields: List[str] = []
        ann_changed = False
        has_doc_stmt = any(s.kind == D.DOC for s in new_body)
        for pair in body.pairs:
            self.courtesy()  # type: ignore[attr-defined]
            o, n = pair.old, pair.new
            assert n is not None
            if ctx.settled(pair):
                continue
            node = n.node
            member = f"{qual}.{n.name}"
            try:
                if n.kind == D.DEF:
                    if is_protocol and o is None:
                        raise StagingRefusal(f"protocol {qual} gains member {n.name}; the protocol's member set is fixed at class creation", n.first, "restart to change a protocol's members")
                    self._stage_def(ctx, o, n, scope)
                    continue
                if n.kind == D.CLASS:
                    if o is None:
                        self._stage_new_class(cast(ast.ClassDef, node), chain + [cast(ast.ClassDef, node)], globals_, ctx.filename, ctx.flags)
                        code = self._compile_in_class([node], chain, ctx.filename, ctx.flags)
                        stage.actions.append(ClassExecAction(stage.name, member, n.first, cls, code, ctx.g, (n.name,), "added"))
                        ns[n.name] = Pending(f"class {member}")
                        plan.add("added", member, n.first, "nested class")
                    else:
                        self._stage_changed_class(ctx, o, n, chain + [cast(ast.ClassDef, node)], globals_)
                    continue
                if n.kind == D.DOC:
                    stage.actions.append(DocAction(stage.name, cls, node.value.value))  # type: ignore[attr-defined]
                    plan.add("data", f"{qual}.__doc__", n.first, "docstring")
                    continue
                if n.kind == D.ASSIGN or n.kind == D.IMPORT:
                    if "__slots__" in n.names:
                        raise StagingRefusal(f"__slots__ of {qual} changed; the memory layout of live instances cannot change", n.first, "keep __slots__, or restart")
                    if is_enum:
                        raise StagingRefusal(f"members of enum {qual} changed; enum members cannot be added, removed or changed in place", n.first, "keep the members, or restart")
                    is_ann = isinstance(node, ast.AnnAssign) or (o is not None and isinstance(o.node, ast.AnnAssign))
                    if is_namedtuple and is_ann:
                        raise StagingRefusal(f"fields of NamedTuple {qual} changed; the tuple layout is fixed", n.first, "keep the fields, or restart")
                    if is_protocol and o is None:
                        raise StagingRefusal(f"protocol {qual} gains member {n.name}", n.first, "restart to change a protocol's members")
                    if is_ann:
                        ann_changed = True
                    values_new = literal_bindings(node)
                    values_old = literal_bindings(o.node) if o is not None else None
                    if is_dataclass and is_ann:
                        field_changes = True
                    if values_new is not None and (o is None or values_old is not None):
                        if o is None:
                            values = {k: (MISSING, v) for k, v in values_new.items()}
                        else:
                            assert values_old is not None
                            values = {k: (values_old.get(k, MISSING), v) for k, v in values_new.items()}
                        stage.actions.append(DataAction(stage.name, member, n.first, cls, values, o is None))
                        for k, (ov, nv) in values.items():
                            live_value = class_get(cls, k)
                            if o is None:
                                plan.add("added", f"{qual}.{k}", n.first, "class attribute")
                            elif same_value(live_value, ov):
                                plan.add("data", f"{qual}.{k}", n.first, "live value equals the old source: new value taken")
                            else:
                                plan.add("conflict", f"{qual}.{k}", n.first, "changed at run time: live value kept (checked again at commit)")
                            ns[k] = nv
                        continue
                    if is_dataclass and is_ann:
                        # field default handled by the regenerated dataclass
                        code = self._compile_in_class([node], chain, ctx.filename, ctx.flags)
                        exec_in_class(code, globals_, ns, cls)
                        sync_fields.extend(n.names)
                        plan.add("rerun" if o is not None else "added", member, n.first, "dataclass field")
                        continue
                    code = self._compile_in_class([node], chain, ctx.filename, ctx.flags)
                    exec_in_class(code, globals_, ns, cls)
                    stage.actions.append(ClassExecAction(stage.name, member, n.first, cls, code, ctx.g, sorted(n.bound), "rerun"))
                    plan.add("rerun" if o is not None else "added", member, n.first, "class attribute evaluated at commit")
                    if o is None:
                        ctx.class_gains.setdefault(cls, set()).update(n.bound)
                    continue
                raise StagingRefusal(
                    f"statement in the body of class {qual} changed ({n.summary()!r}); only definitions and assignments in a class body can be updated in place",
                    n.first,
                    "move the logic into a method or the module's __reload_module__",
                )
            except StagingRefusal as exc:
                plan.refuse(member, exc.lineno or n.first, exc.message, exc.hint)
            except Exception as exc:
                plan.refuse(member, error_line(exc, ctx.filename) or n.first, f"staging failed: {describe(exc)}", "fix the patch source")
        # removed members
        gone: Set[str] = set()
        for o in body.removed:
            gone |= o.bound
            if o.kind == D.ASSIGN and "__slots__" in o.names:
                plan.refuse(f"{qual}.__slots__", o.first, f"__slots__ of {qual} removed; the memory layout of live instances cannot change", "keep __slots__, or restart")
            if is_enum and o.kind == D.ASSIGN:
                plan.refuse(f"{qual}.{o.name}", o.first, f"enum member {o.name} removed; enum members cannot change in place", "keep the members, or restart")
            if is_protocol and o.kind in (D.DEF, D.ASSIGN):
                plan.refuse(f"{qual}.{o.name}", o.first, f"protocol member {o.name} removed; the protocol's member set is fixed", "restart to change a protocol's members")
            if is_namedtuple and isinstance(o.node, ast.AnnAssign):
                plan.refuse(f"{qual}.{o.name}", o.first, f"field {o.name} of NamedTuple {qual} removed; the tuple layout is fixed", "keep the fields, or restart")
            if o.kind == D.DOC and not has_doc_stmt:
                stage.actions.append(DocAction(stage.name, cls, None))
            if isinstance(o.node, ast.AnnAssign):
                ann_changed = True
                if is_dataclass:
                    field_changes = True
            if o.kind == D.OTHER and not D.is_noop(o.node):  # a removed `pass` undoes nothing
                plan.refuse(f"{qual}", o.first, f"statement removed from the body of class {qual}; its effects cannot be undone in place", "keep the statement, or restart")
        for pair in body.pairs:
            if pair.old is not None and pair.new is not None and pair.status == D.CHANGED:
                gone |= pair.old.bound - pair.new.bound
        gone -= body.new_bound()
        removed = sorted(name for name in gone if name in cls.__dict__)
        if removed:
            stage.actions.append(RemoveAction(stage.name, cls, removed))
            for name in removed:
                plan.add("removed", f"{qual}.{name}", None)
        if ann_changed:
            anns: List[ast.stmt] = [
                annotation_only(s) for s in nnode.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
            ]
            code = self._compile_in_class(anns or [ast.Pass(lineno=nnode.lineno, col_offset=0)], chain, ctx.filename, ctx.flags)
            try:
                exec_in_class(code, globals_, {}, cls)
            except Exception as exc:
                plan.refuse(f"{qual}.__annotations__", error_line(exc, ctx.filename), f"annotations failed: {describe(exc)}", "fix the annotations")
            else:
                stage.actions.append(AnnotationsAction(stage.name, cls, code, ctx.g))
        if field_changes:
            self._stage_dataclass(ctx, cls, nnode, chain, globals_, sync_fields, not has_doc_stmt)
        if body.changed() and isinstance(cls, abc.ABCMeta):
            stage.actions.append(AbstractsAction(stage.name, cls))

    def _stage_dataclass(
        self,
        ctx: ModuleCtx,
        cls: type,
        node: ast.ClassDef,
        chain: List[ast.ClassDef],
        globals_: Dict[str, Any],
        sync_fields: List[str],
        take_doc: bool,
    ) -> None:
        stage, plan = ctx.stage, ctx.stage.plan
        qual = ".".join(c.name for c in chain)
        params = cls.__dict__.get("__dataclass_params__")
        if "__slots__" in cls.__dict__:
            plan.refuse(qual, node.lineno, f"fields of slotted dataclass {qual} changed; the memory layout of live instances cannot change", "restart to change them")
            return
        kwargs: Optional[Dict[str, Any]] = None
        for dec in node.decorator_list:
            head = dec.func if isinstance(dec, ast.Call) else dec
            try:
                value = eval(compile(ast.Expression(head), ctx.filename, "eval", dont_inherit=True), globals_)
            except Exception:
                continue
            if value is dataclasses.dataclass:
                kwargs = {}
                if isinstance(dec, ast.Call):
                    for kw in dec.keywords:
                        if kw.arg is None:
                            continue
                        kwargs[kw.arg] = eval(compile(ast.Expression(kw.value), ctx.filename, "eval", dont_inherit=True), globals_)
                break
        if kwargs is None:
            plan.refuse(qual, node.lineno, f"fields of dataclass {qual} changed but its @dataclass decorator was not recognised", "use @dataclasses.dataclass directly on the class, or restart")
            return
        del params
        body: List[ast.stmt] = []
        for stmt in node.body:
            if isinstance(stmt, ast.ClassDef):
                continue
            body.append(strip_decorators(stmt) if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) else stmt)
        code = self._compile_in_class(body or [ast.Pass(lineno=node.lineno, col_offset=0)], chain, ctx.filename, ctx.flags)
        try:
            dataclass_regenerate(cls, code, globals_, kwargs)
        except Exception as exc:
            plan.refuse(qual, error_line(exc, ctx.filename) or node.lineno, f"dataclass {qual} cannot be regenerated: {describe(exc)}", "fix the fields")
            return
        stage.actions.append(DataclassRegenAction(stage.name, cls, code, ctx.g, kwargs, sync_fields, take_doc))
        plan.add("class", f"{qual} (dataclass)", node.lineno, "generated methods (__init__, __repr__, __eq__ ...) regenerated; instances created before keep their attributes (new fields read the class default)")
