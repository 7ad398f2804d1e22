"""The stager: diffs each module of a patch against its recorded live source and turns
every difference into actions and plan lines (see the package docstring). Function and


class staging live in ``functions.py`` and ``classes.py``; this file has the batch, the
importer used inside staging namespaces, module-level statements and compilation.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import sys
import types
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, cast

from .. import diff as D
from ..errors import StagingRefusal
from ..instances import HOOK_INSTANCE, InstanceTracker
from ..plan import ModulePlan
from ..snapshot import MISSING, same_value
from ..sources import SourceRecord, SourceRegistry, TextLoader, read_live_source
from ..outline import Outline, new_outline, outline_of
from ..swap import FunctionIndex, find_code
from .actions import ExecAction, RelocateAction, SwapAction
from .batch import compile_defs
from .class_actions import DocAction
from .classes import ClassStaging
from .common import HOOK_CLASS, HOOK_MODULE, MODULE_SYSTEM_NAMES, Pending, describe, error_line, literal_bindings, strip_decorators
from .data_actions import DataAction, RemoveAction
from .functions import FunctionStaging
from .model import ModuleCtx, ModuleStage, OverlayModule, Scope, StagedModule


class Stager(FunctionStaging, ClassStaging):
    """Stages one batch of modules; see the module docstring."""

    def __init__(
        self,
        registry: SourceRegistry,
        tracker: InstanceTracker,
        sources: Dict[str, str],
        unpatchable: Optional[Dict[str, str]] = None,
        courtesy: Optional[Callable[[], None]] = None,
    ) -> None:
        self.unpatchable = dict(unpatchable or {})
        # called between steps: lets the game thread have the GIL (see courtesy.py)
        self.courtesy: Callable[[], None] = courtesy or (lambda: None)
        self.registry = registry
        self.tracker = tracker
        self.sources = dict(sources)
        self.stages: Dict[str, ModuleStage] = {}
        self._in_progress: Set[str] = set()
        self.new_modules: Set[str] = {
            name for name in self.sources if sys.modules.get(name) is None and self.registry.get(name) is None
        }
        self._staged_ns: Dict[str, Dict[str, Any]] = {}
        self._builtins = dict(builtins.__dict__)
        self._builtins["__import__"] = self._import
        self._namespaces: List[Dict[str, Any]] = []  # staging namespaces, emptied after run

    # -- entry point ---------------------------------------------------------

    def run(self) -> List[ModuleStage]:
        """Stage every module (batch order); refusals end up in each module plan."""
        try:
            for name in self.sources:
                self.courtesy()
                self._stage(name)
        finally:
            self._release()
        return [self.stages[name] for name in self.sources]

    def _release(self) -> None:
        """Empty the staging namespaces once staged (actions hold the live ones only).

        They are cycles (a namespace holds the functions staged in it, each holding the
        namespace as its globals, and the stager's own ``__import__``): left to the
        collector, every prepare would push them into the old generation and bring on full
        collections, which stop the game thread for as long as the heap is big.
        """
        for ns in self._namespaces:
            ns.clear()
        self._namespaces.clear()
        self._staged_ns.clear()
        self._builtins.clear()

    # -- the batch-aware importer used inside staging namespaces ---------------

    def _import(
        self,
        name: str,
        globals: Optional[Dict[str, Any]] = None,
        locals: Optional[Dict[str, Any]] = None,
        fromlist: Sequence[str] = (),
        level: int = 0,
    ) -> Any:
        absname = name
        if level:
            package = (globals or {}).get("__package__")
            if not package:
                modname = (globals or {}).get("__name__", "")
                package = modname if "__path__" in (globals or {}) else modname.rpartition(".")[0]
            absname = importlib.util.resolve_name("." * level + name, package) if name else importlib.util.resolve_name(
                "." * level, package
            )
        touches_new = any(n == absname or n.startswith(absname + ".") or absname.startswith(n + ".") for n in self.new_modules)
        if fromlist:
            touches_new = touches_new or any(f"{absname}.{item}" in self.new_modules for item in fromlist)
        if not touches_new:
            return builtins.__import__(name, globals, locals, fromlist, level)
        if fromlist:
            return self._module_view(absname)
        return self._module_view(absname.split(".")[0])

    def _module_view(self, name: str) -> Any:
        """The module ``name`` as staging code should see it (staged parts overlaid)."""
        if name in self.new_modules:
            if name not in self._staged_ns and name not in self._in_progress:
                self._stage(name)
            ns = self._staged_ns.get(name, {})
            view: Any = StagedModule(name, ns)
        else:
            view = importlib.import_module(name)
        overlay: Dict[str, Any] = {}
        prefix = name + "."
        for other in self.new_modules:
            if other.startswith(prefix):
                child = other[len(prefix) :].split(".")[0]
                overlay[child] = None
        if not overlay:
            return view
        resolved = {child: self._module_view(prefix + child) for child in overlay}
        if isinstance(view, StagedModule):
            ns = object.__getattribute__(view, "_hotfleet_ns")
            for child, mod in resolved.items():
                ns.setdefault(child, mod)
            return view
        return OverlayModule(view, resolved)

    # -- per module ------------------------------------------------------------

    def _stage(self, name: str) -> ModuleStage:
        if name in self.stages:
            return self.stages[name]
        self._in_progress.add(name)
        try:
            stage = self._stage_module(name)
        finally:
            self._in_progress.discard(name)
        self.stages[name] = stage
        return stage

    def _new_filename(self, name: str, is_package: bool) -> Tuple[Optional[str], str]:
        """(filename, problem) for a module the patch adds."""
        parent, _, last = name.rpartition(".")
        tail = "__init__.py" if is_package else f"{last}.py"
        if not parent:
            return f"<hotfleet {name}>", ""
        if parent in self.new_modules:
            pfile, problem = self._new_filename(parent, True)
            if pfile is None:
                return None, problem
            if pfile.startswith("<"):
                return f"<hotfleet {name}>", ""
            import os

            base = os.path.dirname(pfile)
            return (os.path.join(base, last, "__init__.py") if is_package else os.path.join(base, tail)), ""
        pmod = sys.modules.get(parent)
        if pmod is None:
            return None, f"parent package {parent} is not imported"
        path = getattr(pmod, "__path__", None)
        if not path:
            return None, f"{parent} is not a package"
        import os

        first = list(path)[0]
        return (os.path.join(first, last, "__init__.py") if is_package else os.path.join(first, tail)), ""

    def _stage_module(self, name: str) -> ModuleStage:
        text = self.sources[name]
        plan = ModulePlan(name)
        live = sys.modules.get(name)
        base = self.registry.get(name)
        is_new = name in self.new_modules
        is_package = (live is not None and hasattr(live, "__path__")) or any(
            other.startswith(name + ".") for other in self.sources
        )
        record_filename = base.filename if base is not None else ""
        placeholder = SourceRecord.make(name, text if isinstance(text, str) else "", record_filename, is_package)
        stage = ModuleStage(name, plan, placeholder, base, live, new_module=is_new, is_package=is_package)
        plan.new_module = is_new
        plan.base_digest = base.digest if base is not None else None
        if not isinstance(text, str):
            plan.refuse(None, None, "new source must be text (str)", "send the full module source as a string")
            return stage
        plan.new_digest = placeholder.digest
        if name == "hotfleet" or name.startswith("hotfleet."):
            plan.refuse(None, None, "the hotfleet runtime cannot patch itself", "upgrade hotfleet with a restart")
            return stage
        if not self.registry.is_managed(name):
            plan.refuse(
                None,
                None,
                f"module {name} is outside the managed packages {list(self.registry.packages)}",
                "patch only modules of the packages given to Runtime(packages=...)",
            )
            return stage
        if live is not None and base is None:
            _rec, reason = read_live_source(live)
            reason = self.unpatchable.get(name) or reason
            plan.refuse(
                None,
                None,
                f"module {name} cannot be patched ({reason or 'imported before the runtime could record its source'})",
                "C extensions and builtin modules cannot be hot patched; ship a new build instead",
            )
            return stage
        if is_new:
            filename, problem = self._new_filename(name, is_package)
            if filename is None:
                plan.refuse(None, None, f"cannot add module {name}: {problem}", "patch the parent package too or import it first")
                return stage
        else:
            assert base is not None
            filename = base.filename
        stage.record = SourceRecord.make(name, text, filename, is_package)
        plan.new_digest = stage.record.digest
        if not is_new and not stage.changed:
            return stage
        if is_new:
            try:
                new_tree = D.parse(text, filename)
                # an added module's loader runs this code; existing modules only ever run
                # the changed statements, compiled on their own
                stage.module_code = compile(new_tree, filename, "exec", dont_inherit=True)
            except SyntaxError as exc:
                plan.refuse(None, exc.lineno, f"syntax error: {exc.msg}", "fix the patch source")
                return stage
            self._stage_new_module(stage, new_tree, text, filename)
            return stage
        assert base is not None and live is not None
        try:
            old_outline = outline_of(base.text, base.lines, filename, base.digest)
        except SyntaxError as exc:  # pragma: no cover - the live source compiled once
            plan.refuse(None, exc.lineno, f"recorded live source does not parse: {exc.msg}", "restart the process")
            return stage
        try:
            # only the text between statements found unchanged is parsed
            new = new_outline(old_outline, text, stage.record.lines, filename, stage.record.digest, self.courtesy)
        except SyntaxError as exc:
            plan.refuse(None, exc.lineno, f"syntax error: {exc.msg}", "fix the patch source")
            return stage
        self._stage_existing(stage, live, old_outline, new, filename)
        return stage

    # -- new modules -----------------------------------------------------------

    def _stage_new_module(self, stage: ModuleStage, tree: ast.Module, text: str, filename: str) -> None:
        name = stage.name
        ns: Dict[str, Any] = {
            "__name__": name,
            "__file__": filename,
            "__package__": name if stage.is_package else name.rpartition(".")[0],
            "__builtins__": self._builtins,
            "__spec__": None,
            "__loader__": None,
            "__doc__": ast.get_docstring(tree, clean=False),
        }
        if stage.is_package:
            ns["__path__"] = []
        self._staged_ns[name] = ns
        self._namespaces.append(ns)
        flags = D.future_flags(tree)
        lines = stage.record.lines
        stmts = D.statements(tree.body, lines)
        scope = Scope(ns, [])
        for stmt in stmts:
            self._stage_added_module_stmt(stage, stmt, scope, filename, flags)
        assert stage.module_code is not None
        stage.loader = TextLoader(name, text, filename, stage.module_code, stage.is_package)
        if HOOK_MODULE in ns:
            stage.plan.add("note", HOOK_MODULE, None, "added module: its top level runs at commit, the hook does not")

    def _stage_added_module_stmt(self, stage: ModuleStage, stmt: D.Stmt, scope: Scope, filename: str, flags: int) -> None:
        plan = stage.plan
        node = stmt.node
        try:
            if stmt.kind == D.DEF:
                code = self._compile_stmt(strip_decorators(node), scope, filename, flags)
                tmp: Dict[str, Any] = {}
                exec(code, scope.globals, tmp)
                self._check_heads(node, scope)
                scope.globals[node.name] = tmp[node.name]  # type: ignore[attr-defined]
                plan.add("added", stmt.name, stmt.first, "function")
            elif stmt.kind == D.CLASS:
                self._stage_new_class(cast(ast.ClassDef, node), [cast(ast.ClassDef, node)], scope.globals, filename, flags)
                scope.globals[node.name] = Pending(f"class {node.name}")  # type: ignore[attr-defined]
                plan.add("added", stmt.name, stmt.first, "class")
            elif stmt.kind == D.IMPORT:
                exec(self._compile_stmt(node, scope, filename, flags), scope.globals)
                plan.add("added", ", ".join(stmt.names), stmt.first, "import")
            elif stmt.kind == D.ASSIGN:
                values = literal_bindings(node)
                if values is not None:
                    scope.globals.update(values)
                else:
                    for n in stmt.bound:
                        scope.globals.setdefault(n, Pending(n))
                plan.add("added", ", ".join(stmt.names), stmt.first, "data")
            elif stmt.kind in (D.OTHER,):
                for n in stmt.bound:
                    scope.globals.setdefault(n, Pending(n))
        except StagingRefusal as exc:
            plan.refuse(stmt.name, exc.lineno or stmt.first, exc.message, exc.hint)
        except Exception as exc:
            plan.refuse(stmt.name, error_line(exc, filename) or stmt.first, f"staging failed: {describe(exc)}", "fix the patch source")

    def _stage_new_class(
        self, node: ast.ClassDef, chain: List[ast.ClassDef], globals_: Dict[str, Any], filename: str, flags: int
    ) -> None:
        """Validate a class the patch adds: its body runs in staging, no class is created."""
        scope = Scope(globals_, chain)
        for expr in list(node.bases) + [k.value for k in node.keywords]:
            self._check_root_name(expr, globals_, None, node.lineno)
        self._check_heads(node, scope, None)
        body: List[ast.stmt] = []
        nested: List[ast.ClassDef] = []
        for stmt in node.body:
            if isinstance(stmt, ast.ClassDef):
                nested.append(stmt)
            elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body.append(strip_decorators(stmt))
            else:
                body.append(stmt)
        ns: Dict[str, Any] = {n.name: Pending(f"class {n.name}") for n in nested}
        code = self._compile_in_class(body or [ast.Pass(lineno=node.lineno, col_offset=0)], chain, filename, flags)
        exec(code, globals_, ns)
        for stmt in node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._check_heads(stmt, Scope(globals_, chain, None, ns), ns)
        for inner in nested:
            self._stage_new_class(inner, chain + [inner], globals_, filename, flags)

    # -- existing modules --------------------------------------------------------

    def _stage_existing(
        self,
        stage: ModuleStage,
        live: types.ModuleType,
        old_outline: Outline,
        new_outline_: Outline,
        filename: str,
    ) -> None:
        plan = stage.plan
        flags = new_outline_.flags
        if flags != old_outline.flags:
            plan.refuse(
                "from __future__",
                None,
                "the patch changes `from __future__` imports",
                "future imports change how the whole module compiles; restart to change them",
            )
            return
        # the records' line lists: split once, here, and reused by linecache at commit
        assert stage.base is not None
        old_lines = stage.base.lines
        new_lines = stage.record.lines
        body = D.diff_bodies(old_outline.stmts, new_outline_.stmts)
        index = FunctionIndex(live, filename, self.courtesy)
        g = live.__dict__
        ns = dict(g)
        ns["__builtins__"] = self._builtins
        self._namespaces.append(ns)
        if isinstance(ns.get("__annotations__"), dict):
            ns["__annotations__"] = dict(ns["__annotations__"])
        scope = Scope(ns, [])
        self.courtesy()
        ctx = ModuleCtx(stage, live, filename, flags, index, g, old_lines, new_lines)
        ctx.def_codes = compile_defs(self._swappable_defs(ctx, body, []), filename, flags)
        for pair in body.pairs:
            self.courtesy()
            try:
                self._stage_module_pair(ctx, pair, scope)
            except StagingRefusal as exc:
                plan.refuse(pair.new.name if pair.new else None, exc.lineno or (pair.new.first if pair.new else None), exc.message, exc.hint)
            except Exception as exc:
                lineno = error_line(exc, filename) or (pair.new.first if pair.new else None)
                plan.refuse(pair.new.name if pair.new else None, lineno, f"staging failed: {describe(exc)}", "fix the patch source")
        # names whose defining statement is gone
        gone: Set[str] = set()
        for old in body.removed:
            gone |= old.bound
            if old.kind == D.OTHER and not D.is_noop(old.node):
                plan.add("note", old.summary(), old.first, "statement removed from the source; its past effects are not undone")
            if old.kind == D.FUTURE:
                plan.refuse("from __future__", old.first, "the patch changes `from __future__` imports", "restart to change them")
        for pair in body.pairs:
            if pair.old is not None and pair.new is not None and pair.status == D.CHANGED:
                gone |= pair.old.bound - pair.new.bound
        gone -= body.new_bound()
        removed = sorted(n for n in gone if n in g and n not in MODULE_SYSTEM_NAMES)
        if removed:
            stage.actions.append(RemoveAction(stage.name, g, removed))
            for n in removed:
                plan.add("removed", n, None)
        if ctx.relocations:
            stage.actions.insert(0, RelocateAction(stage.name, ctx.relocations))
            plan.relocated = len(ctx.relocations)
        stage.relocations = ctx.relocations
        # hooks that will run
        has_module_hook = (HOOK_MODULE in body.new_bound()) or (HOOK_MODULE in g and HOOK_MODULE not in removed)
        stage.module_hook = has_module_hook
        if has_module_hook:
            plan.add("hook", f"{HOOK_MODULE}(old)", None, "runs after the code swap")
        for cls in stage.updated_classes:
            self._plan_class_hooks(stage, cls, ctx)

    def _swappable_defs(
        self, ctx: ModuleCtx, body: D.BodyDiff, chain: List[ast.ClassDef]
    ) -> List[Tuple[List[ast.ClassDef], ast.stmt]]:
        """Changed defs (class bodies included) whose new code is all a commit swaps in:
        same decorators, defaults and annotations. They are compiled together."""
        out: List[Tuple[List[ast.ClassDef], ast.stmt]] = []
        for pair in body.pairs:
            old, new = pair.old, pair.new
            if old is None or new is None or pair.status != D.CHANGED:
                continue
            if new.kind == D.DEF and old.kind == D.DEF:
                onode, nnode = old.node, new.node
                if (
                    D.decorators_dump(onode) == D.decorators_dump(nnode)
                    and D.args_dump(onode, "defaults") == D.args_dump(nnode, "defaults")
                    and D.args_dump(onode, "kw") == D.args_dump(nnode, "kw")
                    and D.annotations_dump(onode) == D.annotations_dump(nnode)
                ):
                    out.append((chain, nnode))
            elif new.kind == D.CLASS and old.kind == D.CLASS:
                _ob, _nb, inner = ctx.class_diff(old, new)
                out.extend(self._swappable_defs(ctx, inner, chain + [cast(ast.ClassDef, new.node)]))
        return out

    def _plan_class_hooks(self, stage: ModuleStage, cls: type, ctx: ModuleCtx) -> None:
        plan = stage.plan
        gains = ctx.class_gains.get(cls, set())
        has_class_hook = getattr(cls, HOOK_CLASS, None) is not None or HOOK_CLASS in gains
        if has_class_hook:
            plan.add("hook", f"{cls.__qualname__}.{HOOK_CLASS}()", None)
        if getattr(cls, HOOK_INSTANCE, None) is not None or HOOK_INSTANCE in gains:
            if self.tracker.is_complete(cls):
                count = self.tracker.registry.count(cls)
                plan.add("hook", f"{cls.__qualname__}.{HOOK_INSTANCE}()", None, "on every live instance (tracked)", count)
            else:
                plan.add(
                    "hook",
                    f"{cls.__qualname__}.{HOOK_INSTANCE}()",
                    None,
                    "instances not tracked yet: one-time heap scan at commit (frozen objects included; its cost grows with the heap), tracked from then on",
                )

    def _stage_module_pair(self, ctx: ModuleCtx, pair: D.Pair, scope: Scope) -> None:
        stage, plan = ctx.stage, ctx.stage.plan
        old, new = pair.old, pair.new
        assert new is not None
        if ctx.settled(pair):
            return
        node = new.node
        if new.kind == D.FUTURE:
            raise StagingRefusal("the patch changes `from __future__` imports", new.first, "restart to change them")
        if new.kind == D.DEF:
            self._stage_def(ctx, old, new, scope)
            return
        if new.kind == D.CLASS:
            if old is None:
                self._stage_new_class(cast(ast.ClassDef, node), [cast(ast.ClassDef, node)], scope.globals, ctx.filename, ctx.flags)
                code = self._compile_stmt(node, scope, ctx.filename, ctx.flags)
                stage.actions.append(ExecAction(stage.name, new.name, new.first, code, ctx.g, "added"))
                scope.globals[new.name] = Pending(f"class {new.name}")
                plan.add("added", new.name, new.first, "class")
            else:
                self._stage_changed_class(ctx, old, new, [cast(ast.ClassDef, node)], scope.globals)
            return
        if new.kind == D.IMPORT:
            code = self._compile_stmt(node, scope, ctx.filename, ctx.flags)
            exec(code, scope.globals)  # validates the import now
            stage.actions.append(ExecAction(stage.name, ", ".join(new.names), new.first, code, ctx.g, "import"))
            plan.add("added" if old is None else "rerun", ", ".join(new.names), new.first, "import")
            return
        if new.kind == D.DOC:
            doc = node.value.value  # type: ignore[attr-defined]
            stage.actions.append(DocAction(stage.name, ctx.g, doc))
            plan.add("data", "__doc__", new.first, "module docstring")
            return
        if new.kind == D.ASSIGN and old is not None and self._stage_changed_lambda(ctx, old, new, scope):
            return
        if new.kind == D.ASSIGN:
            values_new = literal_bindings(node)
            values_old = literal_bindings(old.node) if old is not None else None
            if values_new is not None and (old is None or values_old is not None):
                if old is None:
                    values = {n: (MISSING, v) for n, v in values_new.items()}
                else:
                    assert values_old is not None
                    values = {n: (values_old.get(n, MISSING), v) for n, v in values_new.items()}
                stage.actions.append(DataAction(stage.name, ", ".join(new.names), new.first, ctx.g, values, old is None))
                for n, (o, v) in values.items():
                    live_value = ctx.g.get(n, MISSING)
                    if old is None:
                        plan.add("added", n, new.first, "data")
                    elif same_value(live_value, o):
                        plan.add("data", n, new.first, "live value equals the old source: new value taken" + (" (in place)" if isinstance(live_value, (dict, list, set)) and type(live_value) is type(v) else ""))
                    else:
                        plan.add("conflict", n, new.first, "the game changed it since load: live value kept (checked again at commit)")
                    scope.globals[n] = v
                return
            # fall through: re-run the statement at commit
        code = self._compile_stmt(node, scope, ctx.filename, ctx.flags)
        stage.actions.append(ExecAction(stage.name, new.name, new.first, code, ctx.g, "rerun" if old is not None else "added"))
        plan.add("rerun" if old is not None else "added", new.summary(), new.first, "runs at commit" if old is None else "changed statement re-runs at commit")
        for n in new.bound:
            if n not in scope.globals:
                scope.globals[n] = Pending(n)


    def _stage_changed_lambda(self, ctx: ModuleCtx, old: D.Stmt, new: D.Stmt, scope: Scope) -> bool:
        """``name = lambda ...`` changed: swap the new code into the live lambda, as for a
        ``def`` (references taken before run the new code). False: not such a change (the
        statement is re-run instead)."""
        olam, nlam = _lambda_of(old.node), _lambda_of(new.node)
        if olam is None or nlam is None:
            return False
        if D.signature_dump(olam) != D.signature_dump(nlam) or D.args_dump(olam, "defaults") != D.args_dump(nlam, "defaults") or D.args_dump(olam, "kw") != D.args_dump(nlam, "kw"):
            return False  # defaults are evaluated when the lambda is made: re-run it
        targets = ctx.index.find("<lambda>", olam.lineno)
        if len({id(fn.__code__) for fn in targets}) != 1:
            return False  # none live, or several lambdas on that line: cannot tell them apart
        code = self._compile_stmt(new.node, scope, ctx.filename, ctx.flags)
        new_code = find_code(code, "<lambda>", nlam.lineno)
        if new_code is None or any(fn.__code__.co_freevars != new_code.co_freevars for fn in targets):
            return False
        stage = ctx.stage
        caches: List[Any] = []
        for fn in targets:
            caches.extend(w for w in ctx.index.caches_of(fn) if w not in caches)
        stage.actions.append(
            SwapAction(stage.name, new.name, new.first, "<lambda>", [(fn, fn.__code__) for fn in targets], new_code,
                       None, targets[0].__qualname__, None, ctx.g, None, True, True, True, [], caches)
        )
        stage.plan.add("function", new.name, new.first, "lambda: code swapped in place", len(targets))
        return True

    # -- compilation helpers ----------------------------------------------------

    def _compile_stmt(self, node: ast.stmt, scope: Scope, filename: str, flags: int) -> types.CodeType:
        if scope.is_class:
            return self._compile_in_class([node], scope.chain, filename, flags)
        module = ast.Module(body=[node], type_ignores=[])
        code: types.CodeType = compile(module, filename, "exec", flags=flags, dont_inherit=True)
        return code

    def _compile_in_class(self, nodes: List[ast.stmt], chain: List[ast.ClassDef], filename: str, flags: int) -> types.CodeType:
        """Compile ``nodes`` as the body of the innermost class of ``chain``; return that body's code."""
        inner: List[ast.stmt] = list(nodes)
        for cnode in reversed(chain):
            synthetic = ast.ClassDef(name=cnode.name, bases=[], keywords=[], body=inner, decorator_list=[])
            if sys.version_info >= (3, 12):
                # a generic class's parameters stay: its body and methods close over them
                synthetic.type_params = list(getattr(cnode, "type_params", []))  # type: ignore[attr-defined]
            ast.copy_location(synthetic, cnode)
            synthetic.end_lineno = getattr(cnode, "end_lineno", cnode.lineno)
            inner = [synthetic]
        module = ast.Module(body=inner, type_ignores=[])
        ast.fix_missing_locations(module)
        code: types.CodeType = compile(module, filename, "exec", flags=flags, dont_inherit=True)
        for cnode in chain:
            # a generic class's body is nested in its "<generic parameters of ...>" scope
            found = find_code(code, cnode.name, cnode.lineno)
            if found is None:  # pragma: no cover - the synthetic chain compiled
                raise StagingRefusal(f"class body of {cnode.name} not found in its compilation", cnode.lineno, "restart to change this class")
            code = found
        allowed = {".type_params"} | {getattr(p, "name", "") for c in chain for p in getattr(c, "type_params", [])}
        if not set(code.co_freevars) <= allowed:
            raise StagingRefusal(
                f"class body of {chain[-1].name} needs free variables {code.co_freevars}; unsupported",
                chain[-1].lineno,
                "restart to change this class",
            )
        return code

    def _check_root_name(self, expr: ast.expr, globals_: Dict[str, Any], local: Optional[Dict[str, Any]], lineno: int) -> None:
        root = expr
        while True:
            if isinstance(root, ast.Call):
                root = root.func
            elif isinstance(root, ast.Attribute):
                root = root.value
            elif isinstance(root, ast.Subscript):
                root = root.value
            else:
                break
        if isinstance(root, ast.Name):
            name = root.id
            if (local is not None and name in local) or name in globals_ or name in self._builtins:
                return
            raise StagingRefusal(f"name {name!r} is not defined", getattr(expr, "lineno", lineno), "fix the patch source")

    def _check_heads(self, node: ast.stmt, scope: Scope, local: Optional[Dict[str, Any]] = None) -> None:
        """Decorators are not run at prepare; at least check the names they start from exist."""
        for dec in getattr(node, "decorator_list", ()) or ():
            self._check_root_name(dec, scope.globals, local if local is not None else scope.ns, node.lineno)


def _lambda_of(node: ast.stmt) -> Optional[ast.Lambda]:
    """The lambda of ``name = lambda ...`` (one plain name target), else None."""
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        if isinstance(node.value, ast.Lambda):
            return node.value
    return None
