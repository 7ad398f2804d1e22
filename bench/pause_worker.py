"""One contender on one scenario, in a fresh process: build the world, apply the patch
repeatedly, time the game-thread pause, check what the patched process runs.

Run by ``runtime_pause.py`` only: ``python pause_worker.py SPEC.json OUT.json``.
Standard library only, except that the IPython contenders import IPython (they run under
the bench's own virtualenv). Python 3.9+.

Contenders:
  hotfleet             txn = rt.prepare(patch) (timed apart, wall and CPU); txn.commit() (THE pause);
                       rt.rollback(); then the game thread's tick latency with and without a
                       prepare running on a background thread
  importlib            importlib.reload() of each patched module, sources rewritten alternately
  ipython-deduper      IPython autoreload's ModuleReloader.check() as ``%autoreload 2`` runs it
                       (IPython >= 9.1: statement-diffing DeduperReloader first, superreload
                       as fallback)
  ipython-superreload  the same with the diffing path off (``%autoreload 2-`` / ``--full``)
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gamepkg  # noqa: E402  (needs HERE on sys.path)

perf_counter = time.perf_counter


# --------------------------------------------------------------------------- heap helpers


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2.0 ** 20
    except (OSError, ValueError, AttributeError):
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ru / 2.0 ** 20 if sys.platform == "darwin" else ru / 1024.0


class Entity:
    """Unrelated game-state object (not in the patched package)."""

    def __init__(self, eid: int) -> None:
        self.eid = eid
        self.pos = (eid * 0.5, 1.0, 2.0)
        self.flags = eid & 7
        self.target = None


def build_filler(target_mb: float) -> tuple:
    """Unrelated live objects resembling game state, until RSS grew by ``target_mb``."""
    filler: list = []
    if target_mb <= 0:
        return filler, 0.0
    start = rss_mb()
    i = 0
    chunk = 10000
    while rss_mb() - start < target_mb:
        block = []
        for j in range(i, i + chunk):
            block.append({
                "id": j,
                "name": "player%d" % j,
                "hp": 100 + j % 50,
                "pos": [j * 0.25, 1.0, -2.0],
                "inv": [j, j + 1, j + 2, j + 3],
                "buffs": {"haste": j % 5},
            })
            e = Entity(j)
            if block and j % 3 == 0:
                e.target = block[-1]
            block.append(e)
            block.append((j, "loot", j * 2))
        filler.append(block)
        i += chunk
    return filler, rss_mb() - start


class GcWatch:
    """Counts collections (and their time) that happen inside timed regions."""

    def __init__(self) -> None:
        self.timing = False
        self.counts = [0, 0, 0]
        self.ms = 0.0
        self._t = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if not self.timing:
            return
        if phase == "start":
            self._t = perf_counter()
        else:
            self.counts[info.get("generation", 0)] += 1
            self.ms += (perf_counter() - self._t) * 1e3


# --------------------------------------------------------------------------- the world


class World:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.hooks = bool(spec.get("hooks"))
        self.mods = {name: importlib.import_module(name) for name in gamepkg.module_sources()}
        # references the game took before the patch
        self.funcs = [(m, f, getattr(self.mods[m], f)) for (m, f) in gamepkg.patched_functions()]
        self.unchanged = [(m, f, getattr(self.mods[m], f)) for (m, f) in gamepkg.unchanged_functions()]
        self.pclasses = [(m, c, getattr(self.mods[m], c)) for (m, c) in gamepkg.patched_classes()]
        self.pmeths = gamepkg.patched_methods()
        self.states = {}
        for m, _f in gamepkg.patched_functions():
            mod = self.mods[m]
            mod.STATE["ticks"] = 12345  # run-time data a reload must not wipe
            self.states[m] = mod.STATE

    def build(self) -> dict:
        t0 = perf_counter()
        spec = self.spec
        classes = []
        for m in sorted(self.mods):
            classes.extend(self.mods[m].CLASSES)
        n = int(spec["instances"])
        ncls = len(classes)
        self.instances = [classes[i % ncls](i) for i in range(n)]
        # probes: pre-existing instances of each patched class
        self.probes = []
        self.hook_instances = []
        for m, cname, cls in self.pclasses:
            mine = [o for o in self.instances[: ncls * 20] if type(o) is cls][:10]
            if not mine:
                mine = [cls(-1)]
                self.instances.append(mine[0])
            self.probes.append((m, cname, mine))
        if self.hooks:
            per = int(spec["hook_instances"]) // len(self.pclasses)
            for _m, _c, cls in self.pclasses:
                existing = [o for o in self.instances if type(o) is cls]
                extra = [cls(10 ** 9 + k) for k in range(max(0, per - len(existing)))]
                self.instances.extend(extra)
                self.hook_instances.extend(existing + extra)
        # callbacks stored elsewhere in the game: bound methods of live instances
        self.bound = [(m, c, getattr(objs[0], meth)) for (m, c, objs) in self.probes for meth in self.pmeths]
        t_inst = perf_counter() - t0
        self.filler, filler_mb = build_filler(float(spec["filler_mb"]))
        t_all = perf_counter() - t0
        gc.collect()
        return {
            "build_s": round(t_all, 3),
            "instances_build_s": round(t_inst, 3),
            "filler_mb": round(filler_mb, 1),
            "live_instances": len(self.instances),
            "hook_instances": len(self.hook_instances),
        }

    def verify(self, gen: int, hooks_expected=None) -> dict:
        """What runs now. gen: expected generation of the patched code."""
        res: dict = {}

        def tally(name, oks):
            oks = list(oks)
            res[name] = [sum(1 for ok in oks if ok), len(oks)]

        def call_ok(fn, *args):
            try:
                return fn(*args)[0] == gen
            except Exception:  # noqa: BLE001 - any failure is a wrong result
                return False

        tally("from_import_refs", (call_ok(f, 3) for (_m, _n, f) in self.funcs))
        tally("module_attr", (call_ok(getattr(sys.modules[m], n), 3) for (m, n, _f) in self.funcs))
        tally("old_instances", (call_ok(getattr(o, meth), 1)
                                for (_m, _c, objs) in self.probes for o in objs for meth in self.pmeths))
        tally("bound_methods", (call_ok(bm, 1) for (_m, _c, bm) in self.bound))
        tally("old_class_ref", (call_ok(getattr(cls(7), meth), 1)
                                for (_m, _c, cls) in self.pclasses for meth in self.pmeths))

        def unchanged_ok(f):
            try:
                return f(3)[0] == 0
            except Exception:  # noqa: BLE001
                return False

        tally("unchanged_funcs", (unchanged_ok(f) for (_m, _n, f) in self.unchanged))
        tally("state_kept", (sys.modules[m].STATE is st and st.get("ticks") == 12345
                             for m, st in self.states.items()))
        tally("isinstance", (isinstance(o, getattr(sys.modules[m], c))
                             for (m, c, objs) in self.probes for o in objs))
        if self.hooks and hooks_expected is not None:
            tally("hook_ran", (getattr(o, "reload_gen", None) == hooks_expected for o in self.hook_instances))
        return res


CODE_CHECKS = ("from_import_refs", "module_attr", "old_instances", "bound_methods",
               "old_class_ref", "unchanged_funcs")


def merge_checks(acc: dict, new: dict, phase: str) -> None:
    for k, (ok, n) in new.items():
        key = "%s.%s" % (phase, k)
        a = acc.setdefault(key, [0, 0])
        a[0] += ok
        a[1] += n


# --------------------------------------------------------------------------- contenders


def numeric_fields(obj, prefix="") -> dict:
    """Flatten the numeric fields of a commit report (to_dict(), dataclass or vars)."""
    d = None
    if hasattr(obj, "to_dict"):
        try:
            d = obj.to_dict()
        except Exception:  # noqa: BLE001
            d = None
    if d is None:
        try:
            import dataclasses

            if dataclasses.is_dataclass(obj):
                d = dataclasses.asdict(obj)
        except Exception:  # noqa: BLE001
            d = None
    if d is None:
        d = dict(getattr(obj, "__dict__", {}) or {})
        for name in dir(type(obj)):
            if isinstance(getattr(type(obj), name, None), property):
                try:
                    d[name] = getattr(obj, name)
                except Exception:  # noqa: BLE001
                    pass
    out = {}
    if not isinstance(d, dict):
        return out
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[prefix + str(k)] = v
        elif isinstance(v, dict) and not prefix:
            for k2, v2 in v.items():
                if isinstance(v2, (int, float)) and not isinstance(v2, bool):
                    out["%s.%s" % (k, k2)] = v2
    return out


def plan_summary(txn) -> dict:
    try:
        d = txn.plan.to_dict()
    except Exception as exc:  # noqa: BLE001
        return {"error": repr(exc)}
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            if isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()):
                out[k] = v
            elif isinstance(v, (list, tuple, dict, set)):
                out[k] = len(v)
            elif isinstance(v, (int, float, str, bool)) or v is None:
                out[k] = v
    return out


def run_hotfleet(spec: dict, world_factory, result: dict) -> None:
    sys.path.insert(0, spec["hotfleet_path"])
    import hotfleet  # noqa: PLC0415

    result["hotfleet_file"] = getattr(hotfleet, "__file__", None)
    rt = None
    if spec.get("hotfleet_init", "before") == "before":
        rt = hotfleet.Runtime(packages=[gamepkg.PACKAGE])
    world = world_factory()
    if rt is None:
        rt = hotfleet.Runtime(packages=[gamepkg.PACKAGE])
    result["world"] = world.build()
    patch = gamepkg.patch(hooks=world.hooks, shape=spec.get("shape", "inplace"))
    finish_world(spec, result)
    gw = install_gc_watch()

    samples, prep, prep_cpu, rb, pause_ms, reports, checks = [], [], [], [], [], [], {}
    first = None
    reps = int(spec["reps"])
    t_end = perf_counter() + float(spec["budget_s"])
    i = 0
    while True:
        c0 = time.thread_time()
        t0 = perf_counter()
        txn = rt.prepare(patch)
        t1 = perf_counter()
        c1 = time.thread_time()
        if i == 0:
            result["plan"] = plan_summary(txn)
        if spec.get("collect_between", True):
            gc.collect()  # a quiet server between patches: dead garbage gone, untimed
        gw.timing = True
        t2 = perf_counter()
        report = txn.commit()
        t3 = perf_counter()
        gw.timing = False
        v1 = world.verify(1, hooks_expected=1)
        t4 = perf_counter()
        rt.rollback()
        t5 = perf_counter()
        v0 = world.verify(0, hooks_expected=-1)
        merge_checks(checks, v1, "patched")
        merge_checks(checks, v0, "rolled_back")
        fields = numeric_fields(report)
        if i == 0:
            first = (t3 - t2) * 1e3
            result["first_report"] = fields
        else:
            samples.append((t3 - t2) * 1e3)
            prep.append((t1 - t0) * 1e3)
            prep_cpu.append((c1 - c0) * 1e3)
            rb.append((t5 - t4) * 1e3)
            reports.append(fields)
            if "pause_ms" in fields:
                pause_ms.append(float(fields["pause_ms"]))
        i += 1
        if len(samples) >= reps:
            break
        if perf_counter() > t_end and len(samples) >= int(spec["min_reps"]):
            break
    result.update(samples_ms=samples, first_ms=first, prepare_ms=prep, prepare_cpu_ms=prep_cpu, rollback_ms=rb,
                  report_pause_ms=pause_ms, checks=checks, gc_in_pause=gw.counts,
                  gc_in_pause_ms=round(gw.ms, 3))
    # report fields: per-field medians
    keys = sorted({k for r in reports for k in r})
    result["report_fields"] = {k: [r[k] for r in reports if k in r] for k in keys}
    if world.hooks:
        result["hooks_own_ms"] = time_hooks(world)
    if int(spec.get("tick_samples", 0)) > 0:
        result["ticks"] = tick_latency(rt, patch, int(spec["tick_samples"]))


TICK_S = 0.05  # a 20 Hz game loop
TICK_WORK_S = 0.005  # ~5 ms of game work per tick


def _game_work(seconds: float) -> None:
    """Pure-Python work for about ``seconds`` of CPU (a tick of game logic)."""
    end = time.thread_time() + seconds
    acc = 0
    while time.thread_time() < end:
        for k in range(200):
            acc += k * k
    return None


def _run_ticks(n: int, stop_when=None) -> list:
    """Run ``n`` ticks of a 20 Hz loop on this thread; each sample is how long after it was
    due the tick's work was done (ms): the wait to run (waking, getting the GIL) plus the
    work's own time. A tick is due at its schedule, or when the previous one ended if that
    was later (so one late tick is counted once, not again in every tick after it)."""
    out = []
    next_at = perf_counter()
    prev_end = next_at
    for _ in range(n):
        now = perf_counter()
        if next_at > now:
            time.sleep(next_at - now)
        _game_work(TICK_WORK_S)
        end = perf_counter()
        out.append((end - max(next_at, prev_end)) * 1e3)
        prev_end = end
        next_at += TICK_S
        if stop_when is not None and stop_when():
            break
    return out


def tick_latency(rt, patch: dict, n: int) -> dict:
    """The game thread's tick latency, alone and while prepares of ``patch`` run back to back
    on a background thread (each aborted). The game thread is this (the main) thread."""
    gc.collect()
    base = _run_ticks(n)
    stop = threading.Event()
    prepared = [0]
    errors = []

    def background() -> None:
        try:
            while not stop.is_set():
                txn = rt.prepare(patch)
                txn.abort()
                prepared[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported to the driver
            errors.append(repr(exc))

    gw = GcWatch()
    gc.callbacks.append(gw)
    th = threading.Thread(target=background, name="prepare", daemon=True)
    gw.timing = True
    th.start()
    during = _run_ticks(n)
    stop.set()
    th.join(60)
    gw.timing = False
    gc.callbacks.remove(gw)
    # collections (any thread's) stop every thread: counted so a stall can be told apart
    return {"baseline_ms": base, "during_prepare_ms": during, "prepares": prepared[0], "errors": errors,
            "gc_during": gw.counts, "gc_during_ms": round(gw.ms, 3)}


def time_hooks(world) -> list:
    """The hooks' own time: call each live instance's __reload_instance__ directly."""
    out = []
    for _ in range(5):
        t0 = perf_counter()
        for o in world.hook_instances:
            o.__reload_instance__()
        out.append((perf_counter() - t0) * 1e3)
    return out


_MTIME_BASE = int(time.time()) + 10


def write_sources(root: str, sources: dict, stamp: int) -> None:
    for name, src in sources.items():
        path = gamepkg.module_path(root, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(src)
        # strictly increasing mtimes, later than the files as first written: mtime-based
        # change detection (IPython) always sees the write
        ns = (_MTIME_BASE + stamp) * 10 ** 9
        os.utime(path, ns=(ns, ns))


def run_reloader(spec: dict, world_factory, result: dict) -> None:
    contender = spec["contender"]
    root = spec["workdir"]
    world = world_factory()
    shape = spec.get("shape", "inplace")
    names = sorted(gamepkg.patch())
    reloader = None
    stats = {"deduper_ok": 0, "deduper_fallback": 0}
    if contender.startswith("ipython"):
        import IPython  # noqa: PLC0415
        from IPython.extensions import autoreload as ar  # noqa: PLC0415

        result["ipython_version"] = IPython.__version__
        reloader = ar.ModuleReloader()  # records mtimes (and sources, for the deduper) now
        reloader.enabled = True
        reloader.check_all = True  # as "%autoreload 2" (the documented default usage)
        dr = getattr(reloader, "deduper_reloader", None)
        result["deduper_available"] = dr is not None
        if contender == "ipython-deduper":
            if dr is None:
                raise RuntimeError("IPython %s has no deduperreload (needs IPython >= 9.1)"
                                   % IPython.__version__)
            dr.enabled = True
            orig = dr.maybe_reload_module

            def counted(module, _orig=orig):
                ok = _orig(module)
                stats["deduper_ok" if ok else "deduper_fallback"] += 1
                return ok

            dr.maybe_reload_module = counted
        elif dr is not None:
            dr.enabled = False  # "%autoreload 2-": superreload only
    result["world"] = world.build()
    finish_world(spec, result)
    if reloader is not None:
        # what the polling part of every pause costs: a check() that finds nothing changed
        idle = []
        for _ in range(5):
            t0 = perf_counter()
            reloader.check()
            idle.append((perf_counter() - t0) * 1e3)
        result["idle_check_ms"] = idle
        result["modules_polled"] = len(sys.modules)
    gw = install_gc_watch()
    sources = {0: gamepkg.original(world.hooks), 1: gamepkg.patch(world.hooks, shape)}
    samples, checks, failures = [], {}, []
    first = None
    reps = int(spec["reps"])
    t_end = perf_counter() + float(spec["budget_s"])
    i = 0
    while True:
        gen = 1 if i % 2 == 0 else 0
        write_sources(root, sources[gen], i + 1)
        if spec.get("collect_between", True):
            gc.collect()  # a quiet server between patches: dead garbage gone, untimed
        gw.timing = True
        t0 = perf_counter()
        if reloader is None:
            for name in names:
                importlib.reload(sys.modules[name])
        else:
            reloader.check()
        t1 = perf_counter()
        gw.timing = False
        if reloader is not None and reloader.failed:
            failures.append(sorted(reloader.failed))
            reloader.failed.clear()
        merge_checks(checks, world.verify(gen), "patched" if gen else "reverted")
        if i == 0:
            first = (t1 - t0) * 1e3
        else:
            samples.append((t1 - t0) * 1e3)
        i += 1
        if len(samples) >= reps:
            break
        if perf_counter() > t_end and len(samples) >= int(spec["min_reps"]):
            break
    result.update(samples_ms=samples, first_ms=first, checks=checks, reload_failures=failures[:3],
                  gc_in_pause=gw.counts, gc_in_pause_ms=round(gw.ms, 3))
    if contender == "ipython-deduper":
        result["deduper_stats"] = stats


def install_gc_watch() -> GcWatch:
    gw = GcWatch()
    gc.callbacks.append(gw)
    return gw


def finish_world(spec: dict, result: dict) -> None:
    gc.collect()
    result["heap"] = {"rss_mb": round(rss_mb(), 1), "gc_objects": len(gc.get_objects())}
    if spec.get("freeze"):
        gc.freeze()
        result["heap"]["frozen"] = gc.get_freeze_count()


def main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as fh:
        spec = json.load(fh)
    result = {"contender": spec["contender"], "scenario": spec["scenario"], "status": "ok",
              "python": sys.version.split()[0], "executable": sys.executable}
    try:
        sys.dont_write_bytecode = True
        gamepkg.write_package(spec["workdir"], hooks=bool(spec.get("hooks")))
        sys.path.insert(0, spec["workdir"])

        def world_factory():
            return World(spec)

        if spec["contender"] == "hotfleet":
            run_hotfleet(spec, world_factory, result)
        else:
            run_reloader(spec, world_factory, result)
    except BaseException as exc:  # noqa: BLE001 - report everything to the driver
        result["status"] = "error"
        result["error"] = "%s: %s" % (type(exc).__name__, exc)
        result["traceback"] = traceback.format_exc()[-4000:]
    with open(out_path, "w") as fh:
        json.dump(result, fh)
    sys.stdout.flush()
    sys.stderr.flush()
    # tearing down a heap of millions of objects takes seconds and measures nothing
    os._exit(0)


if __name__ == "__main__":
    main()
