"""Classes: updated in place, identities kept; layout changes refused."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import hotfleet


def test_method_change_reaches_instances_and_subclasses(pkg):
    rt, m = pkg.load(
        "mobs",
        """
        class Monster:
            def __init__(self, hp):
                self.hp = hp
            def hit(self, n):
                self.hp -= n
                return self.hp
        class Boss(Monster):
            pass
        """,
    )
    Monster, Boss = m.Monster, m.Boss
    mob, boss = Monster(10), Boss(100)
    method = Monster.__dict__["hit"]
    rt.prepare({m.__name__: pkg.src("""
        class Monster:
            def __init__(self, hp):
                self.hp = hp
            def hit(self, n):
                self.hp -= n * 2
                return self.hp
        class Boss(Monster):
            pass
        """)}).commit()
    assert m.Monster is Monster and Monster.__dict__["hit"] is method
    assert mob.hit(1) == 8 and boss.hit(10) == 80
    assert isinstance(mob, m.Monster) and isinstance(boss, m.Monster)


def test_static_class_methods_and_property_parts(pkg):
    rt, m = pkg.load(
        "props",
        """
        class Stats:
            def __init__(self):
                self._hp = 1
            @staticmethod
            def kind():
                return "old"
            @classmethod
            def make(cls):
                return (cls.__name__, "old")
            @property
            def hp(self):
                return self._hp
            @hp.setter
            def hp(self, v):
                self._hp = v
            @hp.deleter
            def hp(self):
                self._hp = 0
        """,
    )
    s = m.Stats()
    prop = m.Stats.__dict__["hp"]
    txn = rt.prepare({m.__name__: pkg.src("""
        class Stats:
            def __init__(self):
                self._hp = 1
            @staticmethod
            def kind():
                return "new"
            @classmethod
            def make(cls):
                return (cls.__name__, "new")
            @property
            def hp(self):
                return self._hp * 10
            @hp.setter
            def hp(self, v):
                self._hp = v + 1
            @hp.deleter
            def hp(self):
                self._hp = -1
        """)})
    assert len(txn.plan.modules[0].of("function")) == 5
    txn.commit()
    assert m.Stats.__dict__["hp"] is prop
    assert s.kind() == "new" and m.Stats.make() == ("Stats", "new")
    s.hp = 4
    assert s.hp == 50
    del s.hp
    assert s._hp == -1


def test_nested_class_method_change(pkg):
    rt, m = pkg.load(
        "nested",
        """
        class Zone:
            class Spawner:
                def rate(self):
                    return 1
        """,
    )
    sp = m.Zone.Spawner()
    rt.prepare({m.__name__: pkg.src("""
        class Zone:
            class Spawner:
                def rate(self):
                    return 2
        """)}).commit()
    assert sp.rate() == 2 and m.Zone.Spawner.rate.__qualname__ == "Zone.Spawner.rate"


def test_added_method_with_zero_argument_super_sees_live_class(pkg):
    rt, m = pkg.load(
        "supers",
        """
        class Base:
            def greet(self):
                return "base"
        class Child(Base):
            def other(self):
                return 1
        """,
    )
    c = m.Child()
    txn = rt.prepare({m.__name__: pkg.src("""
        class Base:
            def greet(self):
                return "base"
        class Child(Base):
            def other(self):
                return 1
            def greet(self):
                return "child+" + super().greet()
        """)})
    txn.commit()
    assert c.greet() == "child+base"
    fn = m.Child.__dict__["greet"]
    assert fn.__closure__[0].cell_contents is m.Child
    assert fn.__globals__ is m.__dict__


def test_changed_method_with_super_and_method_gaining_super(pkg):
    rt, m = pkg.load(
        "supers2",
        """
        class Base:
            def __init__(self):
                self.base = True
            def tick(self):
                return ["base"]
        class Child(Base):
            def __init__(self):
                super().__init__()
                self.child = 1
            def tick(self):
                return ["child"]
        """,
    )
    Child = m.Child
    old = Child()
    txn = rt.prepare({m.__name__: pkg.src("""
        class Base:
            def __init__(self):
                self.base = True
            def tick(self):
                return ["base"]
        class Child(Base):
            def __init__(self):
                super().__init__()
                self.child = 2
            def tick(self):
                return super().tick() + ["child"]
        """)})
    notes = [i.detail for i in txn.plan.modules[0].of("note")]
    assert any("super()" in n for n in notes)
    txn.commit()
    assert Child().child == 2 and Child().base is True
    assert old.tick() == ["base", "child"]
    assert Child.__dict__["tick"].__closure__[0].cell_contents is Child


def test_added_and_removed_members_and_new_class(pkg):
    rt, m = pkg.load(
        "members",
        """
        class Shop:
            tax = 0.1
            def old_price(self):
                return 1
        """,
    )
    shop = m.Shop()
    txn = rt.prepare({m.__name__: pkg.src("""
        class Shop:
            tax = 0.1
            discount = 0.5
            def price(self):
                return 2
        class Vendor(Shop):
            def price(self):
                return super().price() + 1
        """)})
    plan = txn.plan.modules[0]
    assert {i.obj for i in plan.of("removed")} == {"Shop.old_price"}
    assert {"Shop.discount", "Shop.price", "Vendor"} <= {i.obj for i in plan.of("added")}
    txn.commit()
    assert not hasattr(shop, "old_price") and shop.price() == 2 and shop.discount == 0.5
    assert m.Vendor().price() == 3 and m.Vendor.__module__ == m.__name__
    rt.rollback()
    assert shop.old_price() == 1 and not hasattr(m, "Vendor") and not hasattr(m.Shop, "discount")


def test_dataclass_gaining_a_field(pkg):
    rt, m = pkg.load(
        "dc",
        """
        from dataclasses import dataclass, field
        @dataclass
        class Item:
            name: str
            weight: int = 1
        """,
    )
    old = m.Item("sword")
    Item = m.Item
    txn = rt.prepare({m.__name__: pkg.src("""
        from dataclasses import dataclass, field
        @dataclass
        class Item:
            name: str
            weight: int = 1
            rarity: str = "common"
            tags: list = field(default_factory=list)
            def __reload_instance__(self):
                # a default_factory field has no class default: initialize it
                if "tags" not in self.__dict__:
                    self.tags = []
        """)})
    txn.commit()
    assert m.Item is Item
    new = Item("axe", 3, "rare")
    assert new.rarity == "rare" and new.tags == []
    assert old.rarity == "common" and "rarity" not in old.__dict__  # old instances see the default
    assert old.tags == [] and old == Item("sword", 1, "common")
    assert [f.name for f in dataclasses.fields(Item)] == ["name", "weight", "rarity", "tags"]
    assert "rarity='common'" in repr(Item("x"))
    assert list(inspect.signature(Item).parameters) == ["name", "weight", "rarity", "tags"]
    rt.rollback()
    assert [f.name for f in dataclasses.fields(Item)] == ["name", "weight"]
    with pytest.raises(TypeError):
        Item("a", 1, "rare")


def test_enum_methods_change_but_members_are_refused(pkg):
    rt, m = pkg.load(
        "colors",
        """
        import enum
        class Color(enum.Enum):
            RED = 1
            BLUE = 2
            def describe(self):
                return "old " + self.name
        """,
    )
    red = m.Color.RED
    rt.prepare({m.__name__: pkg.src("""
        import enum
        class Color(enum.Enum):
            RED = 1
            BLUE = 2
            def describe(self):
                return "new " + self.name
        """)}).commit()
    assert red.describe() == "new RED" and m.Color.RED is red
    with pytest.raises(hotfleet.PrepareError) as info:
        rt.prepare({m.__name__: pkg.src("""
            import enum
            class Color(enum.Enum):
                RED = 1
                BLUE = 2
                GREEN = 3
                def describe(self):
                    return "new " + self.name
            """)})
    assert "enum" in str(info.value) and info.value.lineno == 5
    assert list(m.Color) == [m.Color.RED, m.Color.BLUE]


def test_slots_class_methods_change_but_layout_is_refused(pkg):
    rt, m = pkg.load(
        "slotted",
        """
        class Vec:
            __slots__ = ("x", "y")
            def __init__(self, x, y):
                self.x, self.y = x, y
            def norm(self):
                return abs(self.x) + abs(self.y)
        """,
    )
    v = m.Vec(3, -4)
    rt.prepare({m.__name__: pkg.src("""
        class Vec:
            __slots__ = ("x", "y")
            def __init__(self, x, y):
                self.x, self.y = x, y
            def norm(self):
                return (self.x ** 2 + self.y ** 2) ** 0.5
        """)}).commit()
    assert v.norm() == 5.0
    with pytest.raises(hotfleet.PrepareError) as info:
        rt.prepare({m.__name__: pkg.src("""
            class Vec:
                __slots__ = ("x", "y", "z")
                def __init__(self, x, y):
                    self.x, self.y = x, y
                def norm(self):
                    return (self.x ** 2 + self.y ** 2) ** 0.5
            """)})
    assert "__slots__" in str(info.value)
    assert m.Vec.__slots__ == ("x", "y")


def test_metaclass_class_methods_change_but_metaclass_and_bases_refused(pkg):
    rt, m = pkg.load(
        "metas",
        """
        class Meta(type):
            def describe(cls):
                return "meta-old"
        class Other(type):
            pass
        class A:
            pass
        class Thing(A, metaclass=Meta):
            def act(self):
                return "old"
        """,
    )
    t = m.Thing()
    rt.prepare({m.__name__: pkg.src("""
        class Meta(type):
            def describe(cls):
                return "meta-new"
        class Other(type):
            pass
        class A:
            pass
        class Thing(A, metaclass=Meta):
            def act(self):
                return "new"
        """)}).commit()
    assert m.Thing.describe() == "meta-new" and t.act() == "new"
    for header in ("class Thing(A, metaclass=Other):", "class Thing(metaclass=Meta):"):
        with pytest.raises(hotfleet.PrepareError) as info:
            rt.prepare({m.__name__: pkg.src(f"""
                class Meta(type):
                    def describe(cls):
                        return "meta-new"
                class Other(type):
                    pass
                class A:
                    pass
                {header}
                    def act(self):
                        return "newer"
                """)})
        assert "bases or metaclass" in str(info.value)
    assert type(m.Thing) is m.Meta and t.act() == "new"


def test_namedtuple_generic_protocol_classes(pkg):
    rt, m = pkg.load(
        "typed",
        """
        from typing import Generic, NamedTuple, Protocol, TypeVar
        T = TypeVar("T")
        class Point(NamedTuple):
            x: int
            y: int = 0
            def total(self):
                return self.x + self.y
        class Box(Generic[T]):
            def __init__(self, item: T):
                self.item = item
            def get(self) -> T:
                return self.item
        class Greeter(Protocol):
            def greet(self) -> str:
                return "hello"
        class English(Greeter):
            pass
        """,
    )
    p, b, e = m.Point(1, 2), m.Box[int](5), m.English()
    rt.prepare({m.__name__: pkg.src("""
        from typing import Generic, NamedTuple, Protocol, TypeVar
        T = TypeVar("T")
        class Point(NamedTuple):
            x: int
            y: int = 0
            def total(self):
                return (self.x + self.y) * 100
        class Box(Generic[T]):
            def __init__(self, item: T):
                self.item = item
            def get(self) -> T:
                return [self.item]
        class Greeter(Protocol):
            def greet(self) -> str:
                return "HELLO"
        class English(Greeter):
            pass
        """)}).commit()
    assert p.total() == 300 and b.get() == [5] and e.greet() == "HELLO"
    with pytest.raises(hotfleet.PrepareError, match="NamedTuple"):
        rt.prepare({m.__name__: rt.live_source(m.__name__).replace("y: int = 0", "y: int = 0\n    z: int = 0")})
    with pytest.raises(hotfleet.PrepareError, match="protocol"):
        rt.prepare({m.__name__: rt.live_source(m.__name__).replace(
            'return "HELLO"', 'return "HELLO"\n    def wave(self) -> str:\n        return "o/"')})
    assert m.Point._fields == ("x", "y") and not hasattr(m.Greeter, "wave")


def test_init_subclass_registry_untouched_by_prepare_and_commit(pkg):
    pkg.write(
        "entity",
        """
        REGISTRY = {}
        class Entity:
            def __init_subclass__(cls, **kw):
                super().__init_subclass__(**kw)
                REGISTRY.setdefault(cls.__name__, []).append(cls)
        """,
    )
    rt, m = pkg.load(
        "orcs",
        f"""
        from {pkg.name}.entity import Entity
        class Orc(Entity):
            def roar(self):
                return "old"
        """,
    )
    entity = pkg.imp("entity")
    assert entity.REGISTRY == {"Orc": [m.Orc]}
    txn = rt.prepare({m.__name__: pkg.src(f"""
        from {pkg.name}.entity import Entity
        class Orc(Entity):
            def roar(self):
                return "new"
        """)})
    assert entity.REGISTRY == {"Orc": [m.Orc]}  # no shadow class was created
    txn.commit()
    assert entity.REGISTRY == {"Orc": [m.Orc]} and m.Orc().roar() == "new"


def test_class_decorator_change_is_refused(pkg):
    rt, m = pkg.load(
        "decorated",
        """
        import functools
        class Plain:
            def __lt__(self, other):
                return True
            def __eq__(self, other):
                return False
        """,
    )
    with pytest.raises(hotfleet.PrepareError, match="class decorators"):
        rt.prepare({m.__name__: pkg.src("""
            import functools
            @functools.total_ordering
            class Plain:
                def __lt__(self, other):
                    return True
                def __eq__(self, other):
                    return False
            """)})
    assert "__le__" not in m.Plain.__dict__


def test_added_cached_property_gets_set_name(pkg):
    rt, m = pkg.load(
        "cprop",
        """
        import functools
        class Player:
            def __init__(self, level):
                self.level = level
        """,
    )
    pl = m.Player(3)
    rt.prepare({m.__name__: pkg.src("""
        import functools
        class Player:
            def __init__(self, level):
                self.level = level
            @functools.cached_property
            def power(self):
                return self.level * 10
        """)}).commit()
    assert pl.power == 30 and pl.__dict__["power"] == 30


def test_class_attribute_statement_changed_re_evaluated_in_class_namespace(pkg):
    rt, m = pkg.load(
        "clsattrs",
        """
        BASE = 10
        class Unit:
            speed = BASE * 2
            def move(self):
                return self.speed
        """,
    )
    u = m.Unit()
    rt.prepare({m.__name__: pkg.src("""
        BASE = 10
        class Unit:
            speed = BASE * 3
            def move(self):
                return self.speed
        """)}).commit()
    assert u.move() == 30


def test_non_definition_statement_in_class_body_is_refused(pkg):
    rt, m = pkg.load(
        "clsstmt",
        """
        class Table:
            rows = []
            rows.append(1)
        """,
    )
    with pytest.raises(hotfleet.PrepareError, match="class body"):
        rt.prepare({m.__name__: pkg.src("""
            class Table:
                rows = []
                rows.append(2)
            """)})
    assert m.Table.rows == [1]
