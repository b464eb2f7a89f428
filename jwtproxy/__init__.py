"""jwtproxy: a JWT-validating API gateway."""

__version__ = "0.1.0"
