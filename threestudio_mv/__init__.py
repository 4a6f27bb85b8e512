"""threestudio-mv: text-to-3D with multi-view diffusion.

The registry maps a module's public name (used in configs, e.g. ``"implicit-volume"``) to its class.
"""
from typing import Callable, Dict, Type, TypeVar

__version__ = "0.1.0"

T = TypeVar("T")
_REGISTRY: Dict[str, type] = {}


def register(name: str) -> Callable[[Type[T]], Type[T]]:
    """Class decorator: make ``cls`` findable by ``name``."""

    def decorator(cls: Type[T]) -> Type[T]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"module name '{name}' is registered twice")
        _REGISTRY[name] = cls
        return cls

    return decorator


def find(name: str) -> type:
    """Return the class registered under ``name``; a UserError names the known modules otherwise."""
    _import_builtin_modules()
    if name not in _REGISTRY:
        from threestudio_mv.utils.errors import UserError

        raise UserError(f"unknown module type '{name}'; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


_BUILTIN_PACKAGES = ("threestudio_mv.data", "threestudio_mv.models", "threestudio_mv.systems")
_imported = False


def _import_builtin_modules() -> None:
    """Import every built-in module once so that its @register runs.

    Done lazily (at the first find) so that `import threestudio_mv` stays light; CLI entry points
    (`__main__` modules) are skipped.
    """
    global _imported
    if _imported:
        return
    import importlib
    import pkgutil

    for package_name in _BUILTIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, prefix=package_name + "."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    _imported = True
