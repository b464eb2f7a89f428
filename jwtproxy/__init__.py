"""jwtproxy: a JWT-validating API gateway."""

import os as _os

from jwtproxy import compiled as _compiled

__version__ = "0.1.0"

# Before any module of the request path is imported: JWTPROXY_PURE_PYTHON=1 runs them from their
# source even where compiled ones are installed (jwtproxy.compiled).
_compiled.select(_os.path.dirname(__file__))
