"""The old path of hotswap.inside.live_store, kept for apps that import `hotswap.live_store`.

The name is an alias of the same module object (not a copy), so its classes and state are
the ones hotswap.inside.live_store has.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("hotswap.inside.live_store")
