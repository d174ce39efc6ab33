"""The old path of hotswap.inside.entry, kept for inis that name it:
`module = hotswap.entry:application`.

The name is an alias of the same module object (not a copy), so its classes and state are
the ones hotswap.inside.entry has.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("hotswap.inside.entry")
