"""The built-in adapter methods, one module each (``lora``, ``hydra``, ``nola``, ...).

Importing this package imports every module in it, and each registers its method with
``jaxattn.lowrank.register_method``; a new method is a new file here, nothing else to edit.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
