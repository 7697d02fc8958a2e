"""Everything this package knows about each mlx-lm MoE architecture.

Where the MoE block, its gate and its experts sit in a decoder layer; what the gate returns;
the routing map (where mlx-lm exposes it as a module-level function we call it; where it is
inline in a block's ``__call__`` we restate it here, and the tests check it against the
block's own choice); which attributes hold top-k (the builder's dense surrogate changes them);
and which attention projections carry keys and values (the builder's token scope). A new
architecture is one ``RouterSpec`` in ``SPECS``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .routing import RoutingMap, softmax_topk, topk_softmax

# attention projections whose outputs carry keys and values (the builder's token scope)
KV_PROJECTIONS = ("k_proj", "v_proj", "kv_a_proj_with_mqa")
# attributes holding the number of experts a token runs, on a block, its gate or its router
TOP_K_ATTRS = ("top_k", "num_experts_per_tok")


@dataclass(frozen=True)
class RouterSpec:
    """How to find and read the router of one architecture.

    ``block``: attribute of a decoder layer holding the MoE block (a dense layer lacks the
    gate and is skipped). ``gate``: dotted path in the block to the module that computes
    router logits. ``experts``: path to the SwitchGLU. ``gate_returns``: ``logits`` when
    the gate is a linear layer, ``assignment`` when it returns (indices, weights) itself and
    its weight matrix is ``gate.weight``. ``score``: the dense score its routing map reads
    logits as (``RoutingMap.score``), known without building the map.
    """

    block: str
    gate: str
    experts: str
    gate_returns: str
    routing: Callable[[nn.Module, nn.Module], RoutingMap]
    score: str = "softmax"


def _olmoe(block, gate):
    return softmax_topk(block.top_k, block.num_experts, bool(block.norm_topk_prob))


def _qwen2_moe(block, gate):
    return softmax_topk(block.top_k, block.num_experts, False)


def _mixtral(block, gate):
    return topk_softmax(block.num_experts_per_tok, block.num_experts)


def _gpt_oss(block, gate):
    return topk_softmax(block.num_experts_per_tok, block.num_local_experts)


def _granitemoe(block, gate):
    return topk_softmax(block.router.top_k, block.router.num_experts)


def _phimoe(block, gate):
    sparsemixer = importlib.import_module("mlx_lm.models.phimoe").sparsemixer

    def select(z):
        return sparsemixer(z, top_k=block.top_k, jitter_eps=block.jitter_eps)

    return RoutingMap(block.num_experts, block.top_k, "softmax", select)


def _grouped_sigmoid(module: str):
    """DeepSeek-V3 / GLM-4-MoE: sigmoid scores, bias-corrected group selection."""

    def routing(block, gate):
        fn = importlib.import_module(f"mlx_lm.models.{module}").group_expert_select

        def select(z):
            return fn(
                z,
                gate.e_score_correction_bias,
                gate.top_k,
                gate.n_group,
                gate.topk_group,
                gate.routed_scaling_factor,
                gate.norm_topk_prob,
            )

        return RoutingMap(gate.n_routed_experts, gate.top_k, "sigmoid", select)

    return routing


def _deepseek_v2(block, gate):
    k, n_group, topk_group = gate.top_k, gate.n_group, gate.topk_group
    grouped = gate.topk_method == "group_limited_greedy"

    def select(z):
        p = mx.softmax(z, axis=-1, precise=True)
        if grouped:
            lead = p.shape[:-1]
            p = p.reshape(*lead, n_group, -1)
            drop = n_group - topk_group
            group_idx = mx.stop_gradient(
                mx.argpartition(p.max(axis=-1, keepdims=True), kth=drop - 1, axis=-2)
            )
            p = mx.put_along_axis(p, group_idx[..., :drop, :], mx.array(0.0, p.dtype), axis=-2)
            p = p.reshape(*lead, -1)
        inds = mx.stop_gradient(mx.argpartition(-p, kth=k - 1, axis=-1)[..., :k])
        return inds, mx.take_along_axis(p, inds, axis=-1) * gate.routed_scaling_factor

    return RoutingMap(gate.n_routed_experts, k, "softmax", select)


SPECS: dict[str, RouterSpec] = {
    "olmoe": RouterSpec("mlp", "gate", "switch_mlp", "logits", _olmoe),
    "qwen2_moe": RouterSpec("mlp", "gate", "switch_mlp", "logits", _qwen2_moe),
    "qwen3_moe": RouterSpec("mlp", "gate", "switch_mlp", "logits", _olmoe),
    "mixtral": RouterSpec("block_sparse_moe", "gate", "switch_mlp", "logits", _mixtral),
    "gpt_oss": RouterSpec("mlp", "router", "experts", "logits", _gpt_oss),
    "phimoe": RouterSpec("block_sparse_moe", "gate", "switch_mlp", "logits", _phimoe),
    "granitemoe": RouterSpec(
        "block_sparse_moe", "router.layer", "switch_mlp", "logits", _granitemoe
    ),
    "deepseek_v2": RouterSpec("mlp", "gate", "switch_mlp", "assignment", _deepseek_v2),
    "deepseek_v3": RouterSpec(
        "mlp", "gate", "switch_mlp", "assignment", _grouped_sigmoid("deepseek_v3"), "sigmoid"
    ),
    "glm4_moe": RouterSpec(
        "mlp", "gate", "switch_mlp", "assignment", _grouped_sigmoid("glm4_moe"), "sigmoid"
    ),
}


def get_path(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def set_path(module: nn.Module, path: str, value: nn.Module) -> None:
    *parents, last = path.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, last, value)


def model_type(model) -> str:
    """The model's model_type: ``model.args`` in mlx-lm, ``model.config`` in transformers."""
    for holder in (getattr(model, "args", None), getattr(model, "config", None), model):
        mt = getattr(holder, "model_type", None)
        if mt is not None:
            return mt
    raise ValueError("cannot tell the model's model_type (no model.args or model.config)")


def spec_for(model, specs: dict | None = None, package: str = "mlx_knnmoe") -> RouterSpec:
    """The model's RouterSpec in ``specs`` (default: the MLX table)."""
    specs = SPECS if specs is None else specs
    mt = model_type(model)
    if mt not in specs:
        raise ValueError(
            f"model_type '{mt}' is not supported by {package}; "
            f"supported: {', '.join(sorted(specs))}"
        )
    return specs[mt]


def moe_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder-layer index -> MoE block, for every layer that routes (dense layers skipped).

    Indices are the full model's, also on a pipeline stage (whose ``model.layers`` holds only
    its own layers)."""
    spec = spec_for(model)
    stage = pipeline_layers(model)
    offset = stage.start if stage is not None else 0
    found = {}
    for i, layer in enumerate(model.layers):
        block = getattr(layer, spec.block, None)
        if block is not None and get_path(block, spec.gate) is not None:
            if get_path(block, spec.experts) is not None:
                found[offset + i] = block
    if not found and pipeline_layers(model) is None:
        raise ValueError(f"no MoE layers found in this {model_type(model)} model")
    return found


def pipeline_layers(model: nn.Module) -> range | None:
    """The decoder layers (full-model indices) this rank runs when mlx-lm split the model
    into pipeline stages, else None."""
    inner = getattr(model, "model", None)
    if getattr(inner, "pipeline_size", 1) <= 1:
        return None
    return range(inner.start_idx, inner.end_idx)


def own_gate(gate: nn.Module) -> nn.Module:
    """The model's own gate module, looking through a wrapper that keeps it as ``inner``."""
    return getattr(gate, "inner", gate)


def routing_map(spec: RouterSpec, block: nn.Module) -> RoutingMap:
    """The routing map of one MoE block, read from its current settings."""
    return spec.routing(block, own_gate(get_path(block, spec.gate)))


def router_logits(spec: RouterSpec, gate: nn.Module, x: mx.array) -> mx.array:
    """The gate's logits z = x W^T for router inputs x (a gate returning an assignment
    computes them from its weight matrix)."""
    gate = own_gate(gate)
    return gate(x) if spec.gate_returns == "logits" else x @ gate.weight.T
