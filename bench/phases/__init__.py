"""The bench's phases, registered in one place: REGISTRY, in the order they run.

A phase is one module here with
    the first line of its docstring     what it measures (bench/run.py --help lists it)
    NEEDS = ("data",)                  phases that must run before it in the same run, because
                                       it reads what they leave in the Bench (measure.Bench
                                       says who writes what); declared here and nowhere else
    QUICK = True                       part of --quick (False: only in the full run)
    def run(b):                        b is the measure.Bench; add rows with b.r.add(...)
A phase that needs the 255 tunnels but not a particular earlier phase calls
b.ensure_tunnels() instead of declaring NEEDS.

Adding a phase: write phases/NAME.py, add it to REGISTRY below at the place it runs, and list it
in bench/run.py's docstring (bench/test_bench.py holds the two lists equal).
"""

import collections
import importlib

Phase = collections.namedtuple("Phase", "name needs quick summary run")

REGISTRY = [importlib.import_module("phases." + name) for name in (
    "up", "data", "why", "burst", "data255", "check", "scrape", "restart", "cost", "wg", "bisect",
)]


class UsageError(ValueError):
    """A --phases selection that cannot run; the message is one sentence for the user."""


def phase(module):
    return Phase(module.__name__.split(".")[-1], tuple(module.NEEDS), bool(module.QUICK),
                 (module.__doc__ or "").strip().splitlines()[0], module.run)


def all_phases(registry=None):
    return [phase(m) for m in (REGISTRY if registry is None else registry)]


def resolve(names, quick=False, registry=None):
    """The phases to run, in registry order, for the names asked (None: all of them, or the
    QUICK ones with quick). UsageError (one sentence) for an unknown name or a phase whose
    NEEDS are not all asked for: refused before anything is built."""
    known = all_phases(registry)
    by_name = dict((p.name, p) for p in known)
    if names is None:
        return [p for p in known if p.quick or not quick]
    bad = [n for n in names if n not in by_name]
    if bad:
        raise UsageError("unknown phase %s: choose from %s"
                         % (", ".join(bad), ", ".join(p.name for p in known)))
    chosen = set(names)
    for p in known:
        missing = [n for n in p.needs if n not in chosen]
        if p.name in chosen and missing:
            raise UsageError("phase %s needs %s in the same run (it measures what %s leaves): "
                             "use --phases %s" % (p.name, " and ".join(missing),
                                                  " and ".join(missing),
                                                  ",".join(_with_needs(by_name, known, names))))
    return [p for p in known if p.name in chosen]


def _with_needs(by_name, known, names):
    """names plus everything they need, transitively, in registry order."""
    want, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n not in want:
            want.add(n)
            todo.extend(by_name[n].needs)
    return [p.name for p in known if p.name in want]
