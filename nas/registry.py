"""Name -> object registries, so that adding an op, a space or a strategy is a one-file change.

A registry maps a config name (``space=darts_rnn``) to a factory.  When a dataclass schema is given,
it is also stored in Hydra's ConfigStore as ``schema/<group>/<name>`` (outside the group, so it is
not offered as a choice), and the YAML file of that name lists it in its defaults and get typed, struct-checked keys (a misspelled key is an error).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Type

from hydra.core.config_store import ConfigStore


class Registry:
    """A named collection of factories for one config group.

    Args:
        group: the Hydra config group the entries belong to (``"space"``, ``"strategy"``, ...).
    """

    def __init__(self, group: str):
        self.group = group
        self._entries: Dict[str, Any] = {}
        self._schemas: Dict[str, Type] = {}

    def register(self, name: str, config: Optional[Type] = None) -> Callable[[Any], Any]:
        """Decorator: register ``obj`` under ``name`` (and its dataclass ``config`` schema).

        Raises:
            ValueError: if ``name`` is already registered in this group.
        """

        def decorator(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.group} {name!r} is registered twice")
            self._entries[name] = obj
            if config is not None:
                self._schemas[name] = config
                ConfigStore.instance().store(group=f"schema/{self.group}", name=name, node=config)
            return obj

        return decorator

    def get(self, name: str) -> Any:
        """The entry registered as ``name``.

        Raises:
            KeyError: with the list of valid names, if ``name`` is unknown.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.group} {name!r}; valid names: {', '.join(sorted(self._entries))}"
            ) from None

    def schema(self, name: str) -> Optional[Type]:
        """The dataclass schema registered with ``name`` (None if it has none)."""
        self.get(name)
        return self._schemas.get(name)

    def names(self) -> list:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_modules(package: str, path) -> None:
    """Import every module of ``package`` (its ``__path__``), so that each one that registers an entry does: adding
    a space, strategy or task is adding its file (plus its ``conf/`` yaml), with no list to edit.  Sorted by name, so
    the registries fill in the same order everywhere."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        importlib.import_module(f"{package}.{info.name}")
