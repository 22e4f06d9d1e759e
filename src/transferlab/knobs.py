"""Knobs: each setting declared once, with its default, one line of doc and its rules, and
checked by one function wherever its value comes from.

    n_layer: int = knob(2, "transformer blocks", ge=1)

The domain dataclasses declare their settings this way (model.GPTConfig, tasks.TaskSpec)
and run `check_knobs(self)` in `__post_init__`. config.py declares its own sections the
same way, takes its `model` and `task` sections from those two classes, and checks every
value a YAML file, the environment or `--set` gives with `check_value`. So a bad value
breaks the same rule in the same words from Python and from config.yaml; only the name in
front differs (config.py adds where the value came from):

    TaskSpec(min_len=4)           ValueError: TaskSpec.min_len must be >= 6, got 4
    task: {min_len: 4}            ConfigError: config.yaml: task.min_len must be >= 6, got 4

Rules: gt / ge / lt / le (bounds), choices (allowed values), nonempty (strings and
lists), expand (a function applied to the checked value). For a tuple field the bounds
and choices apply to each element. A rule between two knobs of one dataclass is a `Rule`
in the class's RULES. This module imports nothing from transferlab, so any module may
declare knobs (docs/configuration.md#the-checks-and-what-you-see-when-one-fails).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import operator
import typing
from typing import Callable, NamedTuple


def knob(default, doc, **rules):
    """A dataclass field that is a knob: its default, one line for the reader, its rules."""
    if isinstance(default, list):
        default = tuple(default)  # frozen all the way down: lists are stored as tuples
    return dataclasses.field(default=default, metadata={"doc": doc, **rules})


class Rule(NamedTuple):
    """A rule between two knobs, e.g. TaskSpec's "min_len <= seq_len - 1".

    When `holds(obj)` is false, `key` is to blame: "<key> must be <must_be>, got <value>".
    `must_be(obj, name)` words the requirement and writes a knob's name as `name(knob)`, so
    that one rule reads right for each reader: TaskSpec.seq_len from Python, task.seq_len
    from config.yaml. `other` is the knob `key` is held against (config.py blames the file
    that set the later of the two). Keys may be dotted paths: "task.seq_len".
    """

    key: str
    other: str
    holds: Callable[[object], bool]
    must_be: Callable[[object, Callable[[str], str]], str]

    def broken(self, obj, name=lambda key: key):
        """None if the rule holds for `obj`, else the one-line message."""
        if self.holds(obj):
            return None
        value = functools.reduce(getattr, self.key.split("."), obj)
        return f"{name(self.key)} must be {self.must_be(obj, name)}, got {value!r}"

    def within(self, section):
        """The same rule one level up, for an object whose `section` attribute holds the
        knobs (config.task for a TaskSpec rule); keys become "section.key"."""
        return Rule(f"{section}.{self.key}", f"{section}.{self.other}",
                    lambda obj: self.holds(getattr(obj, section)),
                    lambda obj, name: self.must_be(getattr(obj, section),
                                                   lambda key: name(f"{section}.{key}")))


def check_knobs(obj):
    """Check every knob field of the dataclass instance `obj`, then its RULES; the first
    broken rule raises ValueError naming class and field. Called from __post_init__."""
    cls = type(obj).__name__
    for f, type_ in _knob_fields(type(obj)):
        check_value(getattr(obj, f.name), type_, f.metadata, f"{cls}.{f.name}")
    for rule in getattr(obj, "RULES", ()):
        message = rule.broken(obj, lambda key: f"{cls}.{key}")
        if message:
            raise ValueError(message)


@functools.cache
def _knob_fields(cls):
    """(field, type) of each knob of the dataclass `cls`, types resolved once."""
    types = typing.get_type_hints(cls)
    return tuple((f, types[f.name]) for f in dataclasses.fields(cls) if "doc" in f.metadata)


def check_value(value, type_, rules, name):
    """The value of knob `name` if it has type `type_` (a scalar type, or tuple[T, ...]
    given as a list or tuple) and obeys `rules`; else ValueError "<name> must be ...".

    Returns it normalised: ints become floats for a float knob, lists become tuples, and
    an `expand` rule is applied.
    """
    if typing.get_origin(type_) is tuple:
        item_type = typing.get_args(type_)[0]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list of {_NAMES[item_type][1]}, got {show(value)}")
        if rules.get("nonempty") and not value:
            raise ValueError(f"{name} must not be empty")
        value = tuple(_check_scalar(item, item_type, rules, f"{name}[{i}]")
                      for i, item in enumerate(value))
    else:
        value = _check_scalar(value, type_, rules, name)
        if rules.get("nonempty") and value == "":
            raise ValueError(f"{name} must not be empty")
    return rules["expand"](value) if "expand" in rules else value


# type -> (how a message names one, how it names several)
_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), bool: ("true or false", "true/false values")}

# type -> does this value have it? True is an int in Python, but not a number here;
# NumPy's numbers count (numbers.Integral, numbers.Real), YAML never makes them.
_HAS_TYPE = {
    int: lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
    float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),  # 1 is fine
    str: lambda v: isinstance(v, str),
    bool: lambda v: isinstance(v, bool),
}

# bound rule -> (test, symbol); lower bounds first, so a pair reads "in [low, high)"
_BOUNDS = {"gt": (operator.gt, ">"), "ge": (operator.ge, ">="),
           "lt": (operator.lt, "<"), "le": (operator.le, "<=")}


def _check_scalar(value, type_, rules, name):
    """Type first, then choices, then bounds; returns the value (ints made floats)."""
    if not _HAS_TYPE[type_](value):
        raise ValueError(f"{name} must be {_NAMES[type_][0]}, got {show(value)}")
    if type_ is float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")

    if "choices" in rules and value not in rules["choices"]:
        close = difflib.get_close_matches(str(value), rules["choices"], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name} must be one of {', '.join(rules['choices'])}, "
                         f"got {value!r}{hint}")
    bounds = [(rule, rules[rule]) for rule in _BOUNDS if rule in rules]
    if not all(_BOUNDS[rule][0](value, limit) for rule, limit in bounds):
        raise ValueError(f"{name} must be {_range_text(bounds)}, got {value!r}")
    return value


def _range_text(bounds):
    """[('ge', 0), ('lt', 1)] -> 'in [0, 1)'; a single bound -> '> 0', '<= 1'."""
    if len(bounds) == 2:
        (low, a), (high, b) = bounds
        return f"in {'(' if low == 'gt' else '['}{a}, {b}{')' if high == 'lt' else ']'}"
    (rule, limit), = bounds
    return f"{_BOUNDS[rule][1]} {limit}"


def show(value):
    """How a wrong value is shown in a message: its type, then the value."""
    if value is None:
        return "nothing (null)"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"
