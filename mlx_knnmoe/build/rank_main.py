"""One rank of a distributed build under mlx.launch, which runs a script, not a module."""

import sys

sys.path.pop(0)  # this file's folder: its modules belong to the package, not the top level

from mlx_knnmoe.commands.build_memory import main  # noqa: E402

main()
