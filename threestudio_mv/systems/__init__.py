"""Importing this package registers every built-in system."""
import importlib
import pkgutil

for _info in pkgutil.walk_packages(__path__, prefix=__name__ + "."):
    importlib.import_module(_info.name)
