"""The console scripts' names, and ``python -m mlx_knnmoe.<name>`` for each of them.

``python -m`` runs a module, and the commands live in ``commands/`` (``mlx_knnmoe.build_memory``
is even the Python API's function). ``CommandFinder`` on ``sys.meta_path`` supplies a module
``mlx_knnmoe.<name>`` that runs ``commands/<name>.py``'s ``main``, but only while ``python -m``
is looking for its module (``sys.argv[0] == "-m"``, as the interpreter documents): a plain
``import mlx_knnmoe.build_memory`` still fails, and the attribute stays the function.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

# each runs as ``mlx_knnmoe <name>``, ``mlx_knnmoe.<name>`` and ``python -m mlx_knnmoe.<name>``
COMMANDS = (
    "demo",
    "generate",
    "chat",
    "server",
    "build_memory",
    "evaluate",
    "merge",
    "convert",
    "compress_memory",
    "benchmark",
)
_COMMANDS_DIR = Path(__file__).parent / "commands"


class CommandLoader(importlib.abc.InspectLoader):
    """Source that imports ``commands/<name>.py`` and runs its ``main`` as ``__main__``."""

    def __init__(self, name: str):
        self.name = name

    def get_source(self, fullname: str) -> str:
        return (
            f"from {__package__}.commands.{self.name} import main\n"
            "if __name__ == '__main__':\n    main()\n"
        )

    def is_package(self, fullname: str) -> bool:
        return False


class CommandFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec:
        package, _, name = fullname.rpartition(".")
        if package != __package__ or name not in COMMANDS or sys.argv[:1] != ["-m"]:
            return None
        # the origin names the command's file: click shows "python -m mlx_knnmoe.<name>"
        origin = str(_COMMANDS_DIR / f"{name}.py")
        return importlib.util.spec_from_loader(fullname, CommandLoader(name), origin=origin)


def install_finder() -> None:
    """Let ``python -m mlx_knnmoe.<command>`` run the command (idempotent)."""
    if not any(isinstance(f, CommandFinder) for f in sys.meta_path):
        sys.meta_path.append(CommandFinder())
