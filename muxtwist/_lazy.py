"""
Lazy attributes for the public facades (PEP 562).

``muxtwist``, ``muxtwist.matchers`` and ``muxtwist.actions`` re-export names
from modules that pull in much of Twisted (``twisted.application``,
``twisted.web``) or ``prometheus_client``. A facade lists each such name with
the module that defines it; the module is imported the first time the name is
read, so ``import muxtwist.matchers.tls`` costs only the matcher.

Each facade keeps its ``_LAZY`` mapping a literal, so the import-cycle test
can read it without importing anything.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(
    namespace: MutableMapping[str, Any], lazy: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """
    The ``__getattr__`` and ``__dir__`` of a facade.

    :param namespace: the facade's ``globals()``.
    :param lazy: public name -> the module that defines it.
    """
    module_name = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        where = lazy.get(name)
        if where is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where), name)
        namespace[name] = value  # the next read is an ordinary attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *lazy})

    return __getattr__, __dir__
