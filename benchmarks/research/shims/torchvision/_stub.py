"""Placeholder objects for the torchvision names timm's *data* modules import at import time.

None of them is used by the model code measured here; touching one at run time raises."""


class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _make(f"{cls.__name__}.{name}")


def _make(name):
    def __init__(self, *a, **k):
        raise RuntimeError(f"torchvision stand-in: {name} is not available")
    return _Meta(name, (object,), {"__init__": __init__})


def module_getattr(modname):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _make(f"{modname}.{name}")
    return __getattr__
