"""The `diffuapriel` command line. Importing this package imports no model code (nor torch)."""

from .main import main

__all__ = ["main"]
