"""Functions: code swapped in place, identities kept, decorators and closures handled."""

from __future__ import annotations

import traceback

import pytest

import hotfleet


def test_function_body_change_reaches_from_import_references(pkg):
    rt, m = pkg.load(
        "combat",
        """
        def damage(x):
            return x * 2
        HANDLERS = {"dmg": damage}
        """,
    )
    from_import = m.damage
    stored = m.HANDLERS["dmg"]
    txn = rt.prepare({m.__name__: pkg.src("""
        def damage(x):
            return x * 3
        HANDLERS = {"dmg": damage}
        """)})
    assert [i.obj for i in txn.plan.modules[0].of("function")] == ["damage"]
    report = txn.commit()
    assert report.counts["functions_swapped"] == 1
    assert from_import(2) == 6 and stored(2) == 6 and m.damage is from_import
    assert m.HANDLERS["dmg"] is from_import  # the unchanged statement was not re-run


def test_moved_function_is_not_changed_but_tracebacks_follow(pkg):
    rt, m = pkg.load(
        "mover",
        """
        def boom():
            raise ValueError("x")
        """,
    )
    fn = m.boom
    old_code = fn.__code__
    txn = rt.prepare({m.__name__: pkg.src("""
        # three lines
        # were added
        # above
        def boom():
            raise ValueError("x")
        """)})
    mp = txn.plan.modules[0]
    assert mp.of("function") == [] and mp.relocated == 1
    txn.commit()
    assert fn.__code__ is not old_code and fn.__code__.co_code == old_code.co_code
    assert fn.__code__.co_firstlineno == 4
    with pytest.raises(ValueError) as info:
        fn()
    frame = traceback.extract_tb(info.value.__traceback__)[-1]
    assert frame.lineno == 5 and "raise ValueError" in (frame.line or "")


def test_defaults_kept_when_unchanged_taken_when_changed(pkg):
    rt, m = pkg.load(
        "defaults",
        """
        def remember(x, cache={}):
            cache[x] = True
            return len(cache)
        def scale(x, factor=2, *, bias=0):
            return x * factor + bias
        """,
    )
    m.remember("a")
    m.remember("b")
    txn = rt.prepare({m.__name__: pkg.src("""
        def remember(x, cache={}):
            cache[x] = True
            return len(cache) * 10
        def scale(x, factor=5, *, bias=1):
            return x * factor + bias
        """)})
    txn.commit()
    assert m.remember("c") == 30  # the live default dict (with a, b) survived
    assert m.scale(2) == 11 and m.scale.__kwdefaults__ == {"bias": 1}


def test_doc_annotations_qualname_updated(pkg):
    rt, m = pkg.load(
        "docs",
        """
        def f(x: int) -> int:
            "old doc"
            return x
        """,
    )
    f = m.f
    rt.prepare({m.__name__: pkg.src("""
        def f(x: str) -> str:
            "new doc"
            return x + "!"
        """)}).commit()
    assert f.__doc__ == "new doc"
    assert f.__annotations__ == {"x": str, "return": str}
    assert f("a") == "a!" and f.__qualname__ == "f"


def test_alias_rebound_never_overwrites_the_original(pkg):
    rt, m = pkg.load(
        "alias",
        """
        def foo():
            return "foo"
        def bar():
            return "bar"
        f = foo
        """,
    )
    foo = m.foo
    foo_code = foo.__code__
    txn = rt.prepare({m.__name__: pkg.src("""
        def foo():
            return "foo"
        def bar():
            return "bar"
        f = bar
        """)})
    assert [i.obj for i in txn.plan.modules[0].of("rerun")] == ["f = bar"]
    txn.commit()
    assert m.f is m.bar and m.f() == "bar"
    assert foo() == "foo" and foo.__code__ is foo_code


def test_wraps_decorated_function_swaps_inner_and_does_not_rerun_decorator(pkg):
    pkg.write(
        "deco",
        """
        import functools
        CALLS = []
        def traced(fn):
            CALLS.append(fn.__name__)
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                return ("traced", fn(*args, **kwargs))
            return wrapper
        """,
    )
    rt, m = pkg.load(
        "wrapped",
        f"""
        from {pkg.name}.deco import traced
        @traced
        def attack(x):
            return x + 1
        """,
    )
    deco = pkg.imp("deco")
    wrapper = m.attack
    inner = wrapper.__wrapped__
    assert deco.CALLS == ["attack"]
    rt.prepare({m.__name__: pkg.src(f"""
        from {pkg.name}.deco import traced
        @traced
        def attack(x):
            return x + 100
        """)}).commit()
    assert m.attack is wrapper and wrapper.__wrapped__ is inner
    assert wrapper(1) == ("traced", 101)
    assert deco.CALLS == ["attack"]  # decorator ran once, at import


def test_lru_cache_does_not_serve_stale_results(pkg):
    rt, m = pkg.load(
        "cached",
        """
        import functools
        @functools.lru_cache(maxsize=None)
        def price(item):
            return len(item)
        """,
    )
    cached = m.price
    assert cached("sword") == 5
    rt.prepare({m.__name__: pkg.src("""
        import functools
        @functools.lru_cache(maxsize=None)
        def price(item):
            return len(item) * 100
        """)}).commit()
    assert m.price is cached
    assert cached("sword") == 500
    rt.rollback()
    assert cached("sword") == 5  # cleared again on rollback


def test_live_closure_runs_new_code_with_its_cells(pkg):
    rt, m = pkg.load(
        "closures",
        """
        def make_handler(scale, bonus):
            def handler(x):
                return x * scale + bonus
            return handler
        on_hit = make_handler(2, 1)
        """,
    )
    handler = m.on_hit
    txn = rt.prepare({m.__name__: pkg.src("""
        def make_handler(scale, bonus):
            def handler(x):
                return bonus + scale * x * 10
            return handler
        on_hit = make_handler(2, 1)
        """)})
    assert txn.plan.modules[0].of("closure")
    txn.commit()
    assert m.on_hit is handler
    assert handler(3) == 61  # cells scale=2, bonus=1 kept, in the right order
    assert m.make_handler(1, 0)(5) == 50


def test_closure_with_renamed_cells_is_refused(pkg):
    rt, m = pkg.load(
        "closures2",
        """
        def make_handler(scale):
            def handler(x):
                return x * scale
            return handler
        on_hit = make_handler(2)
        """,
    )
    before = m.on_hit.__code__
    with pytest.raises(hotfleet.PrepareError) as info:
        rt.prepare({m.__name__: pkg.src("""
            def make_handler(factor):
                def handler(x):
                    return x * factor
                return handler
            on_hit = make_handler(2)
            """)})
    assert "closure" in str(info.value) and info.value.lineno == 2
    assert m.on_hit.__code__ is before and m.on_hit(4) == 8
    assert rt.pending is None


def test_subscribed_handler_runs_new_code_and_is_subscribed_once(pkg):
    pkg.write(
        "bus",
        """
        SUBSCRIBERS = []
        def subscribe(fn):
            SUBSCRIBERS.append(fn)
        def publish(x):
            return [fn(x) for fn in SUBSCRIBERS]
        """,
    )
    rt, m = pkg.load(
        "listener",
        f"""
        from {pkg.name} import bus
        def on_hit(x):
            return x
        bus.subscribe(on_hit)
        """,
    )
    bus = pkg.imp("bus")
    rt.prepare({m.__name__: pkg.src(f"""
        from {pkg.name} import bus
        def on_hit(x):
            return -x
        bus.subscribe(on_hit)
        """)}).commit()
    assert bus.publish(4) == [-4]
    assert len(bus.SUBSCRIBERS) == 1


def test_registering_decorator_keeps_registry_entry_live(pkg):
    rt, m = pkg.load(
        "commands",
        """
        COMMANDS = {}
        def command(name):
            def register(fn):
                COMMANDS[name] = fn
                return fn
            return register
        @command("attack")
        def attack():
            return "old"
        """,
    )
    entry = m.COMMANDS["attack"]
    rt.prepare({m.__name__: pkg.src("""
        COMMANDS = {}
        def command(name):
            def register(fn):
                COMMANDS[name] = fn
                return fn
            return register
        @command("attack")
        def attack():
            return "new"
        """)}).commit()
    assert m.COMMANDS == {"attack": entry} and entry() == "new"


def test_decorator_added_rebinds_and_old_references_run_new_code(pkg):
    rt, m = pkg.load(
        "redeco",
        """
        def slow(x):
            return x + 1
        """,
    )
    old_ref = m.slow
    txn = rt.prepare({m.__name__: pkg.src("""
        import functools
        @functools.lru_cache(maxsize=None)
        def slow(x):
            return x + 2
        """)})
    assert any("decorators changed" in i.detail for i in txn.plan.modules[0].of("rerun"))
    txn.commit()
    assert hasattr(m.slow, "cache_info") and m.slow(1) == 3
    assert old_ref(1) == 3  # the old object runs the new body too


def test_async_and_lambda_definitions(pkg):
    import asyncio

    rt, m = pkg.load(
        "asyncs",
        """
        async def fetch():
            return 1
        key = lambda item: item[0]
        """,
    )
    fetch = m.fetch
    rt.prepare({m.__name__: pkg.src("""
        async def fetch():
            return 2
        key = lambda item: item[1]
        """)}).commit()
    assert asyncio.run(fetch()) == 2
    assert m.key((1, 2)) == 2  # the changed lambda statement re-ran


def test_singledispatch_registered_implementations_updated(pkg):
    rt, m = pkg.load(
        "dispatch",
        """
        import functools
        @functools.singledispatch
        def show(x):
            return "any"
        @show.register
        def _(x: int):
            return "int"
        """,
    )
    show = m.show
    rt.prepare({m.__name__: pkg.src("""
        import functools
        @functools.singledispatch
        def show(x):
            return "ANY"
        @show.register
        def _(x: int):
            return "INT"
        """)}).commit()
    assert m.show is show and show("s") == "ANY" and show(3) == "INT"


def test_closure_outer_parameters_reordered_cells_follow_names(pkg):
    rt, m = pkg.load(
        "reorder",
        """
        def make(scale, bonus):
            def handler(x):
                return x * scale + bonus
            return handler
        on_hit = make(10, 1)
        """,
    )
    handler = m.on_hit
    rt.prepare({m.__name__: pkg.src("""
        def make(bonus, scale):
            def handler(x):
                return bonus - x * scale
            return handler
        on_hit = make(1, 10)
        """)}).commit()
    assert handler.__code__.co_freevars == ("bonus", "scale")
    assert handler(2) == 1 - 20  # cells matched by name: scale=10, bonus=1


def test_new_function_runs_in_the_live_module_globals(pkg):
    rt, m = pkg.load("globs", "COUNTER = 0\n")
    rt.prepare({m.__name__: "COUNTER = 0\ndef bump():\n    global COUNTER\n    COUNTER += 1\n    return COUNTER\n"}).commit()
    assert m.bump.__globals__ is m.__dict__
    m.bump()
    assert m.COUNTER == 1
