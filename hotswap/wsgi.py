"""The old path of hotswap.inside.wsgi, kept for apps that `import hotswap.wsgi`.

The name is an alias of the same module object (not a copy), so its classes and state are
the ones hotswap.inside.wsgi has.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("hotswap.inside.wsgi")
