"""Refuse, before routing, a request that no pool of its model can serve (core/capabilities.py)."""
from __future__ import annotations

from gateway.core import capabilities
from gateway.core.errors import BadRequest, NotFound
from gateway.core.protocol import GenerationRequest


def check_servable(g: GenerationRequest, served: frozenset[str]) -> None:
    """404 for an endpoint no pool of the model serves, 400 (naming the parameter) for a feature;
    served: what the model's pools serve between them."""
    missing = g.needs - served
    if not missing:
        return
    endpoints = sorted(m for m in missing if m not in capabilities.FEATURES)
    if endpoints:
        raise NotFound(f"no pool serving the model '{g.model}' serves the {endpoints[0]} endpoint",
                       param="model", code="unsupported_endpoint")
    feature = sorted(missing)[0]
    raise BadRequest(f"no pool serving the model '{g.model}' supports {feature}",
                     param=capabilities.FEATURE_PARAM.get(feature), code="unsupported_parameter")
