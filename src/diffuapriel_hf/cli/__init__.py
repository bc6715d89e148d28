"""The `diffuapriel` command line: its dispatcher is the top-level module `diffuapriel_command` (which imports no
torch), its subcommands' modules live here and in `training` and `hub`."""

from diffuapriel_command import main

__all__ = ["main"]
