"""The one place where the doubles refuse what they do not implement.

optimum-neuron's model registry imports its *inference* modules too (``models/auto_model.py``), which import
dozens of NxD inference names at module level. Those names resolve to :func:`unavailable` placeholders: the
import succeeds, and any use (instantiation or call) raises ``NotImplementedError`` naming the symbol, so the
training path can never run on something the doubles only pretend to have.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

DOUBLED_ROOTS = ("neuronx_distributed", "torch_neuronx", "neuronx_cc", "neuronxcc", "nki")


def unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"neuron SDK test double: {what} is not implemented (the doubles train at pipeline-parallel size 1, without ZeRO-1)"
    )


def unavailable(qualified_name: str) -> type:
    """A placeholder class for an NxD symbol outside the doubled training surface.

    optimum-neuron's inference modules build decorators at import time (``nki_jit()(kernel)``,
    ``@xla_hlo_call``), so constructing a placeholder and applying it to one callable are allowed and give
    another placeholder; calling anything else, or reading any attribute of an instance, raises.
    """

    def init(self, *args, **kwargs):
        return None

    def call(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return unavailable(f"{qualified_name}({getattr(args[0], '__name__', 'fn')})")()
        raise unsupported(qualified_name)

    def getattr_(self, name):
        raise unsupported(f"{qualified_name}.{name}")

    return type(
        qualified_name.rsplit(".", 1)[-1],
        (),
        {
            "__init__": init,
            "__call__": call,
            "__getattr__": getattr_,
            "__class_getitem__": classmethod(lambda cls, item: cls),
        },
    )


def placeholder_getattr(module_name: str):
    """A module ``__getattr__`` (PEP 562) handing out placeholders for names the double does not define."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = unavailable(f"{module_name}.{name}")
        setattr(sys.modules[module_name], name, value)
        return value

    return __getattr__


class _PlaceholderModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Submodules of the doubled packages that have no file here become placeholder modules."""

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] not in DOUBLED_ROOTS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            if finder.find_spec(fullname, path, target) is not None:
                return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = placeholder_getattr(spec.name)
        return module

    def exec_module(self, module):
        return None


def install() -> None:
    if not any(isinstance(f, _PlaceholderModules) for f in sys.meta_path):
        sys.meta_path.insert(0, _PlaceholderModules())
