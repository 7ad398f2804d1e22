"""Deterministic generator of the synthetic game-logic package the pause benchmark patches.

Standard library only; Python 3.9+. Used by ``runtime_pause.py`` (the driver) and by
``pause_worker.py`` (one subprocess per contender and scenario), which both call
``module_sources`` so that every process builds exactly the same package.

Shape (defaults match issue 2):
  package ``benchpkg`` with MODULES modules ``mod00``..``mod19``; each module has
  FUNCS top-level functions ``f00``..``f49`` and CLASSES classes ``Unit<MM>_<C>`` with
  METHODS methods ``m0``..``m9`` (plus ``__init__``), a few top-level data statements
  (a mutable ``STATE`` dict the game writes to at run time, a tuning table) and an
  import.

Every function and method returns ``(GEN, value)``: GEN is 0 in the original source and 1
in the patched one, so a caller can tell which code ran.

The patch (``patched_modules``): in PATCH_MODULES modules (mod00..mod04), PATCH_FUNCS_PER_MODULE
top-level functions each (50 in all) get a new body (GEN 1 and different arithmetic), and in
PATCH_CLASSES classes (``Unit00_0`` and ``Unit01_0``) PATCH_METHODS methods each get a new body.
Nothing else in the module text changes, so a statement-diffing reloader re-runs no
top-level statement.

``shape`` picks how the patch edits a changed function or method: ``"inplace"`` changes
its body without moving any line; ``"shifted"`` also inserts one line into it, so every
definition below the edit moves (what real hotfixes do; the runtime then relocates the code
of every moved function so tracebacks stay right).

``hooks=True`` adds ``__reload_instance__`` to the patched classes (in the original
source too, so the runtime can know the class defines it before the patch); its body
records the generation of the code that ran it in ``self.reload_gen``.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

PACKAGE = "benchpkg"
MODULES = 20
FUNCS = 50
CLASSES = 10
METHODS = 10

PATCH_MODULES = 5
PATCH_FUNCS_PER_MODULE = 10
PATCH_CLASSES = 2
PATCH_METHODS = 5


def module_name(i: int) -> str:
    return "%s.mod%02d" % (PACKAGE, i)


def class_name(mod: int, cls: int) -> str:
    return "Unit%02d_%d" % (mod, cls)


def patched_module_indexes() -> List[int]:
    return list(range(PATCH_MODULES))


def patched_functions() -> List[Tuple[str, str]]:
    """(module, function) pairs whose body the patch changes (50 by default)."""
    out = []
    for m in patched_module_indexes():
        for f in range(PATCH_FUNCS_PER_MODULE):
            # spread over the module: f00, f05, f10, ...
            out.append((module_name(m), "f%02d" % (f * (FUNCS // PATCH_FUNCS_PER_MODULE))))
    return out


def patched_classes() -> List[Tuple[str, str]]:
    """(module, class) pairs whose methods the patch changes: class 0 of mod00, mod01, ..."""
    return [(module_name(m), class_name(m, 0)) for m in range(PATCH_CLASSES)]


def patched_methods() -> List[str]:
    return ["m%d" % (k * (METHODS // PATCH_METHODS)) for k in range(PATCH_METHODS)]


def unchanged_functions() -> List[Tuple[str, str]]:
    """A few functions the patch does not touch (checked to still run old code)."""
    return [(module_name(0), "f01"), (module_name(4), "f49"), (module_name(19), "f07")]


SHAPES = ("inplace", "shifted")


def _function(mod: int, f: int, gen: int, shape: str = "inplace") -> str:
    k = 3 + (mod * FUNCS + f) % 11
    bump = 1 if gen else 0
    extra = "    z = z + 0  # hotfix: one line more\n" if (gen and shape == "shifted") else ""
    return (
        "def f%02d(x, y=%d):\n"
        "    \"\"\"Generated game rule %d of module %d.\"\"\"\n"
        "    z = x * %d + y + %d\n"
        "%s"
        "    if z > 1000:\n"
        "        z = z %% 997\n"
        "    return (%d, z + TUNING['k%d'])\n"
        % (f, k, f, mod, k, bump, extra, gen, f % 4)
    )


def _method(mod: int, cls: int, meth: int, gen: int, shape: str = "inplace") -> str:
    k = 2 + (mod + cls + meth) % 7
    bump = 2 if gen else 0
    extra = "        x = x + 0  # hotfix: one line more\n" if (gen and shape == "shifted") else ""
    return (
        "    def m%d(self, x):\n"
        "        self.calls += 1\n"
        "%s"
        "        return (%d, self.hp * %d + x + self.ident %% 13 + %d)\n"
        % (meth, extra, gen, k, bump)
    )


def module_source(mod: int, gen: int = 0, hooks: bool = False, shape: str = "inplace") -> str:
    """Source of one module; ``gen=1`` is the patched text (only patched modules differ)."""
    pfuncs = {f for (m, f) in patched_functions() if m == module_name(mod)}
    pclasses = {c for (m, c) in patched_classes() if m == module_name(mod)}
    pmeths = set(patched_methods())
    lines = [
        '"""%s: generated game logic for the hotfleet pause benchmark."""\n' % module_name(mod),
        "import math\n",
        "\n",
        "STATE = {'ticks': 0, 'spawned': 0}\n",
        "TUNING = {'k0': 1, 'k1': 2, 'k2': 3, 'k3': %d}\n" % (mod + 4),
        "ZONE_RADIUS = math.sqrt(%d.0)\n" % (100 + mod),
        "\n",
    ]
    for f in range(FUNCS):
        name = "f%02d" % f
        lines.append("\n")
        lines.append(_function(mod, f, gen if name in pfuncs else 0, shape))
    for c in range(CLASSES):
        cname = class_name(mod, c)
        lines.append("\n\n")
        lines.append("class %s:\n" % cname)
        lines.append('    """Generated game entity class %s."""\n' % cname)
        lines.append("    kind = %r\n" % cname)
        lines.append("\n")
        lines.append("    def __init__(self, ident):\n")
        lines.append("        self.ident = ident\n")
        lines.append("        self.hp = 100\n")
        lines.append("        self.calls = 0\n")
        lines.append("        self.reload_gen = -1\n")
        for m in range(METHODS):
            lines.append("\n")
            g = gen if (cname in pclasses and "m%d" % m in pmeths) else 0
            lines.append(_method(mod, c, m, g, shape))
        if hooks and cname in pclasses:
            lines.append("\n")
            lines.append("    def __reload_instance__(self):\n")
            lines.append("        self.reload_gen = %d\n" % (gen if cname in pclasses else 0))
            lines.append("        if self.hp < 0:\n")
            lines.append("            self.hp = 0\n")
    lines.append("\n\n")
    lines.append("CLASSES = [%s]\n" % ", ".join(class_name(mod, c) for c in range(CLASSES)))
    return "".join(lines)


def package_init_source() -> str:
    return '"""benchpkg: generated game-logic package (hotfleet pause benchmark)."""\n'


def module_sources(gen: int = 0, hooks: bool = False, shape: str = "inplace") -> Dict[str, str]:
    """dotted name -> source for every module (gen 0 = as loaded, gen 1 = patched)."""
    return {module_name(i): module_source(i, gen if i in patched_module_indexes() else 0, hooks, shape)
            for i in range(MODULES)}


def patch(hooks: bool = False, shape: str = "inplace") -> Dict[str, str]:
    """The patch: dotted name -> full new source, for the patched modules only."""
    return {module_name(i): module_source(i, 1, hooks, shape) for i in patched_module_indexes()}


def original(hooks: bool = False) -> Dict[str, str]:
    """The original text of the patched modules (what a revert writes back)."""
    return {module_name(i): module_source(i, 0, hooks) for i in patched_module_indexes()}


def write_package(root: str, hooks: bool = False) -> str:
    """Write the gen-0 package under ``root``; returns the directory to put on sys.path."""
    import os

    pkg = os.path.join(root, PACKAGE)
    os.makedirs(pkg, exist_ok=True)
    with open(os.path.join(pkg, "__init__.py"), "w", encoding="utf-8") as fh:
        fh.write(package_init_source())
    for name, src in module_sources(0, hooks).items():
        with open(module_path(root, name), "w", encoding="utf-8") as fh:
            fh.write(src)
    return root


def module_path(root: str, dotted: str) -> str:
    import os

    return os.path.join(root, *dotted.split(".")) + ".py"


def describe() -> str:
    return (
        "%d modules x (%d functions + %d classes x %d methods); patch: %d functions in %d modules"
        " + %d methods in each of %d classes"
        % (MODULES, FUNCS, CLASSES, METHODS, len(patched_functions()), PATCH_MODULES,
           PATCH_METHODS, PATCH_CLASSES)
    )
