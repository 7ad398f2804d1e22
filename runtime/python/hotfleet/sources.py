"""Recording the exact source text every managed module is running.

The runtime never re-reads a file to learn what is live: a deployment may
already have replaced the file on disk.  Modules imported before the
``Runtime`` existed are read once, at creation, from their loader; every
later import of a managed module goes through :class:`RecordingFinder`, whose
loader compiles and executes the very text it records.  Commits and
rollbacks replace the record through the transaction journal.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import linecache
import logging
import sys
import threading
import tokenize
import types
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

log = logging.getLogger("hotfleet")

__all__ = [
    "SourceRecord",
    "SourceRegistry",
    "RecordingFinder",
    "RecordingLoader",
    "TextLoader",
    "digest_text",
    "is_managed",
    "read_live_source",
    "pin_linecache",
]


def digest_text(text: str) -> str:
    """Return the sha256 hex digest of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def is_managed(name: str, packages: Sequence[str]) -> bool:
    """True when ``name`` is one of ``packages`` or a submodule of one."""
    for pkg in packages:
        if name == pkg or name.startswith(pkg + "."):
            return True
    return False


@dataclass(frozen=True)
class SourceRecord:
    """The source a module runs: text, the filename its code objects carry, digest."""

    name: str
    text: str
    filename: str
    digest: str
    is_package: bool = False

    @classmethod
    def make(cls, name: str, text: str, filename: str, is_package: bool = False) -> "SourceRecord":
        """Build a record, computing the digest."""
        return cls(name, text, filename, digest_text(text), is_package)

    @cached_property
    def lines(self) -> List[str]:
        """The text split into lines, as ``linecache`` keeps them: computed once, in
        prepare, so a commit pinning the new text does not split 100 KB on the game thread."""
        return self.text.splitlines(True)


def pin_linecache(filename: str, text: Optional[str], lines: Optional[List[str]] = None) -> Any:
    """Make tracebacks show ``text`` for ``filename``; return the previous cache entry.

    An entry with mtime ``None`` is never invalidated by ``linecache.checkcache``,
    so tracebacks keep showing what runs even after the file on disk changes.
    Passing ``None`` removes the entry.
    """
    previous = linecache.cache.get(filename)
    if text is None:
        linecache.cache.pop(filename, None)
    else:
        linecache.cache[filename] = (len(text), None, lines if lines is not None else text.splitlines(True), filename)
    return previous


def restore_linecache(filename: str, previous: Any) -> None:
    """Put back an entry returned by :func:`pin_linecache`."""
    if previous is None:
        linecache.cache.pop(filename, None)
    else:
        linecache.cache[filename] = previous


def _loader_kind(loader: Any) -> Optional[str]:
    """Name the kind of an unpatchable loader, or None when it may have source."""
    if loader is None:
        return "namespace package or module without loader"
    if isinstance(loader, RecordingLoader):
        loader = loader.inner
    if loader is importlib.machinery.BuiltinImporter or isinstance(loader, importlib.machinery.BuiltinImporter):
        return "builtin module"
    if loader is importlib.machinery.FrozenImporter or isinstance(loader, importlib.machinery.FrozenImporter):
        return "frozen module"
    if isinstance(loader, importlib.machinery.ExtensionFileLoader):
        return "C extension module"
    if isinstance(loader, importlib.machinery.SourcelessFileLoader):
        return "module loaded from bytecode only"
    return None


def read_live_source(module: types.ModuleType) -> Tuple[Optional[SourceRecord], Optional[str]]:
    """Read the source of an already-imported module from its loader (or file).

    Returns ``(record, None)`` or ``(None, reason)`` when the module has no
    Python source the runtime could patch (builtin, C extension, ...).
    """
    name = module.__name__
    spec = getattr(module, "__spec__", None)
    loader = getattr(module, "__loader__", None) or (spec.loader if spec is not None else None)
    kind = _loader_kind(loader)
    if kind is not None:
        return None, kind
    inner = loader.inner if isinstance(loader, RecordingLoader) else loader
    text: Optional[str] = None
    get_source = getattr(inner, "get_source", None)
    if get_source is not None:
        try:
            text = get_source(name)
        except (ImportError, OSError):
            text = None
    filename = (spec.origin if spec is not None and spec.has_location else None) or getattr(module, "__file__", None)
    if text is None and filename and filename.endswith(".py"):
        try:
            with tokenize.open(filename) as fh:
                text = fh.read()
        except OSError:
            text = None
    if text is None or not filename:
        return None, "no Python source available"
    is_package = hasattr(module, "__path__")
    return SourceRecord.make(name, text, filename, is_package), None


def verify_record(module: types.ModuleType, record: SourceRecord) -> Optional[str]:
    """Check that ``record`` is what ``module`` runs; return a problem or None.

    A module imported before the runtime existed is read back from its
    loader, which reads the file *now*: if the file was replaced after the
    import, the text is not what runs.  Comparing the module-level functions'
    code with a compilation of the text catches that (code objects compare by
    value, line numbers included).
    """
    try:
        code = compile(record.text, record.filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        return f"source does not compile: {exc.msg} (line {exc.lineno})"
    compiled: Dict[Tuple[str, int], types.CodeType] = {}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            compiled[(const.co_name, const.co_firstlineno)] = const
    by_name = {name: c for (name, _line), c in compiled.items()}
    for name, value in list(module.__dict__.items()):
        if not isinstance(value, types.FunctionType) or value.__module__ != module.__name__:
            continue
        live = value.__code__
        if live.co_name != name:
            continue
        expected = compiled.get((name, live.co_firstlineno)) or by_name.get(name)
        if expected is None or expected != live:
            return f"function {name} does not match the source read from {record.filename} (file changed after import?)"
    return None


class SourceRegistry:
    """Thread-safe map of module name to the :class:`SourceRecord` it runs."""

    def __init__(self, packages: Sequence[str], on_loaded: Optional[Callable[[types.ModuleType], None]] = None) -> None:
        self.packages: Tuple[str, ...] = tuple(packages)
        self._records: Dict[str, SourceRecord] = {}
        self._lock = threading.Lock()
        self.on_loaded = on_loaded

    def is_managed(self, name: str) -> bool:
        """True when ``name`` belongs to the managed packages."""
        return is_managed(name, self.packages)

    def get(self, name: str) -> Optional[SourceRecord]:
        """Return the record of ``name`` or None."""
        with self._lock:
            return self._records.get(name)

    def set(self, record: SourceRecord) -> Optional[SourceRecord]:
        """Store ``record``; return the record it replaces (None if new)."""
        with self._lock:
            previous = self._records.get(record.name)
            self._records[record.name] = record
        pin_linecache(record.filename, record.text, record.lines)
        return previous

    def restore(self, name: str, previous: Optional[SourceRecord]) -> None:
        """Put back ``previous`` for ``name`` (None removes the record)."""
        with self._lock:
            current = self._records.get(name)
            if previous is None:
                self._records.pop(name, None)
            else:
                self._records[name] = previous
        if previous is None:
            if current is not None:
                pin_linecache(current.filename, None)
        else:
            pin_linecache(previous.filename, previous.text, previous.lines)

    def names(self) -> List[str]:
        """Sorted names of every recorded module."""
        with self._lock:
            return sorted(self._records)

    def digests(self) -> Dict[str, str]:
        """Module name -> sha256 of the recorded source."""
        with self._lock:
            return {name: rec.digest for name, rec in sorted(self._records.items())}

    def loaded(self, module: types.ModuleType) -> None:
        """Called after a managed module finished executing at import."""
        if self.on_loaded is not None:
            try:
                self.on_loaded(module)
            except Exception:  # instrumentation must never break an import
                log.exception("post-import instrumentation of %s failed", module.__name__)


class RecordingLoader(importlib.abc.Loader):
    """Wraps a source loader: compiles and runs exactly the text it records.

    Everything else (``get_resource_reader``, ``is_package`` ...) is delegated
    to the real loader.  The price is that managed modules do not use the
    bytecode cache.
    """

    def __init__(self, inner: Any, registry: SourceRegistry) -> None:
        self.inner = inner
        self.registry = registry

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[types.ModuleType]:
        """Delegate module creation to the real loader."""
        create = getattr(self.inner, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: types.ModuleType) -> None:
        """Compile the recorded text and execute it in ``module``."""
        spec = module.__spec__
        name = spec.name if spec is not None else module.__name__
        text = self.inner.get_source(name) if hasattr(self.inner, "get_source") else None
        if text is None:
            # Not recordable: run it the ordinary way, the module stays unpatchable.
            self.inner.exec_module(module)
            return
        filename = (spec.origin if spec is not None else None) or getattr(module, "__file__", None) or f"<{name}>"
        code = compile(text, filename, "exec", dont_inherit=True)
        record = SourceRecord.make(name, text, filename, spec is not None and spec.submodule_search_locations is not None)
        previous = self.registry.set(record)
        try:
            exec(code, module.__dict__)
        except BaseException:
            self.registry.restore(name, previous)
            raise
        self.registry.loaded(module)

    def __getattr__(self, attr: str) -> Any:
        # Only reached for attributes this wrapper does not define.
        return getattr(self.inner, attr)


class TextLoader(importlib.abc.Loader):
    """Loads a module from text held in memory (modules a patch adds)."""

    def __init__(self, name: str, text: str, filename: str, code: types.CodeType, is_package: bool) -> None:
        self.name = name
        self.text = text
        self.filename = filename
        self.code = code
        self.package = is_package

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[types.ModuleType]:
        """Use the default module creation."""
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        """Execute the precompiled code of the added module."""
        exec(self.code, module.__dict__)

    def get_source(self, name: str) -> str:
        """Return the module's text (used by inspect and tracebacks)."""
        return self.text

    def is_package(self, name: str) -> bool:
        """True when the added module is a package."""
        return self.package


class RecordingFinder(importlib.abc.MetaPathFinder):
    """``sys.meta_path`` entry that wraps the loaders of managed modules.

    ``overrides`` serves modules a commit is adding: they are loaded from the
    patch text, whatever is (or is not) on disk.
    """

    def __init__(self, registry: SourceRegistry) -> None:
        self.registry = registry
        self.overrides: Dict[str, TextLoader] = {}

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]] = None, target: Optional[types.ModuleType] = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        """Find ``fullname`` with the other finders and wrap its loader."""
        if not self.registry.is_managed(fullname):
            return None
        override = self.overrides.get(fullname)
        if override is not None:
            spec = importlib.util.spec_from_loader(
                fullname, override, origin=override.filename, is_package=override.package
            )
            if spec is not None:
                spec.has_location = not override.filename.startswith("<")
            return spec
        for finder in list(sys.meta_path):
            if finder is self or isinstance(finder, RecordingFinder):
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is None:
                continue
            loader = spec.loader
            if (
                loader is not None
                and _loader_kind(loader) is None
                and hasattr(loader, "get_source")
                and hasattr(loader, "exec_module")
                and not isinstance(loader, RecordingLoader)
            ):
                spec.loader = RecordingLoader(loader, self.registry)
            found: importlib.machinery.ModuleSpec = spec
            return found
        return None

    def install(self) -> None:
        """Put this finder first on ``sys.meta_path``."""
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def uninstall(self) -> None:
        """Remove this finder from ``sys.meta_path``."""
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def iter_managed_modules(packages: Iterable[str]) -> List[Tuple[str, types.ModuleType]]:
    """Already-imported modules that belong to ``packages`` (sorted by name)."""
    pk = tuple(packages)
    return sorted(
        ((name, mod) for name, mod in list(sys.modules.items()) if mod is not None and is_managed(name, pk)),
        key=lambda item: item[0],
    )
