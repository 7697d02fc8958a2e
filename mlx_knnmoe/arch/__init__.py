"""Per-architecture knowledge: where routers sit and what their routing maps are."""

from .routing import RoutingMap
from .specs import SPECS, RouterSpec, model_type, moe_layers, routing_map, spec_for

__all__ = [
    "SPECS",
    "RouterSpec",
    "RoutingMap",
    "model_type",
    "moe_layers",
    "routing_map",
    "spec_for",
]
