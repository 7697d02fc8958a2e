"""lm-evaluation-harness with memories: an lm-eval model (mlx-lm's ``MLXLM``, the one
``mlx_lm.evaluate`` registers, plus a memory), and the plain model and each memory run on the
same tasks with their tables side by side. Needs ``pip install "mlx_knnmoe[eval]"``.

Importing this module registers the model with lm-eval as ``mlx_knnmoe``, for
``lm_eval.simple_evaluate(model="mlx_knnmoe", model_args="path_or_hf_repo=DIR,memory=FILE")``.
"""

from __future__ import annotations

from collections.abc import Sequence

import lm_eval
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import make_table
from mlx_lm.evaluate import MLXLM

from ..config import KNNConfig, parse_skip
from ..loading import load_memory
from ..memory.store import Memory
from ..retrieval.attach import attach, detach
from .compare import aligned

Variant = tuple[str, "Memory | None", "KNNConfig | None"]


@register_model("mlx_knnmoe")
class KNNMoELM(MLXLM):
    """mlx-lm's lm-eval model with a memory attached (``memory``: a file, a packaged NAME or
    ``repo_id:file``; ``knn_k``, ``mix``, ``lambda_scale``, ``skip_confident`` as the CLI's
    flags). ``use_memory`` switches memories without reloading the model."""

    def __init__(
        self,
        path_or_hf_repo: str,
        memory: str | None = None,
        knn_k: int | None = None,
        mix: str | None = None,
        lambda_scale: float | None = None,
        skip_confident: str | None = None,
        **kwargs,
    ):
        super().__init__(path_or_hf_repo, **kwargs)
        if memory is not None:
            mem = load_memory(memory, path_or_hf_repo)
            skip = parse_skip(skip_confident) if skip_confident else (None, None)
            overrides = dict(k=knn_k, mix=mix, lambda_scale=lambda_scale)
            overrides.update(skip=skip[0], skip_threshold=skip[1])
            self.use_memory(mem, KNNConfig.from_memory_defaults(mem.retrieval, **overrides))

    def use_memory(self, memory: Memory | None, config: KNNConfig | None = None) -> None:
        """Route with ``memory`` from now on (None: the plain model)."""
        if memory is None:
            detach(self._model)
        else:
            attach(self._model, memory, config)


def task_manager(tasks: Sequence[str], include_path: str | None) -> TaskManager:
    """lm-eval's task index; its built-in tasks (seconds to index) only when some task is
    not found under ``include_path``."""
    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=include_path)


def evaluate_tasks(
    lm: KNNMoELM,
    tasks: Sequence[str],
    variants: Sequence[Variant],
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 0,
    log=print,
) -> dict[str, dict]:
    """lm-eval's results for each (name, memory, config) variant on the same tasks."""
    manager = task_manager(tasks, include_path)
    results = {}
    for name, memory, config in variants:
        log(f"{name}: lm-eval on {', '.join(tasks)}")
        lm.use_memory(memory, config)
        results[name] = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            apply_chat_template=lm.use_chat_template,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    lm.use_memory(None)
    return results


def tables(results: dict[str, dict]) -> str:
    """lm-eval's table for each variant, then every metric with one column per variant."""
    parts = []
    for name, result in results.items():
        parts += [f"{name}:", make_table(result)]
    names = list(results)
    rows = [["task", "metric", *names]]
    first = results[names[0]]["results"]
    for task, metrics in first.items():
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if not isinstance(value, float) or metric.endswith("_stderr"):
                continue
            cells = []
            for name in names:
                got = results[name]["results"][task]
                err = got.get(key.replace(metric, f"{metric}_stderr", 1))
                cells.append(
                    f"{got[key]:.4f}" + (f" ± {err:.4f}" if isinstance(err, float) else "")
                )
            rows.append([task, metric, *cells])
    parts += ["side by side:", *aligned(rows, left=2)]
    return "\n".join(parts)
