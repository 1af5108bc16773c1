"""Config refuses typos at load time: closed sets name the key path and the allowed values, and a
loaded config is immutable all the way down."""
from __future__ import annotations

import typing
from pathlib import Path

import pytest

from gateway import config as config_module
from gateway.config import BUILTIN_PROFILES, ROUTING_FILTERS, ROUTING_PICKERS, ROUTING_SCORERS, ConfigError, \
    config_from_dict, load_config
from gateway.core.wire import PRIORITIES
from gateway.routing import plugins

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("data", "message"), [
    ({"pools": [{"id": "a", "engine": {"runner": "trt"}}]},
     "pools[0].engine.runner: expected one of torch, cuda, tensorrt, null, got 'trt'"),
    ({"pools": [{"id": "a", "engine": {"dtype": "fp8"}}]},
     "pools[0].engine.dtype: expected one of float32, bfloat16, float16, got 'fp8'"),
    ({"pools": [{"id": "a", "engine": {"device": "gpu"}}]},
     "pools[0].engine.device: expected cpu, cuda or cuda:N, got 'gpu'"),
    ({"pools": [{"id": "a", "kind": "vllm"}]}, "pools[0].kind: expected one of meshgate, openai, got 'vllm'"),
    ({"gateway": {"routing": "fastest"}},
     "gateway.routing: expected one of latency, latency-no-cache, prefix, nearest, least-load, round-robin, random, "
     "p2c, got 'fastest'"),
    ({"gateway": {"routing_options": {"slo_policy": "drop"}}},
     "gateway.routing_options.slo_policy: expected one of spill, shed, got 'drop'"),
    ({"gateway": {"routing_options": {"profiles": {"mine": {"scorers": {"speed": 1.0}}}}}},
     "gateway.routing_options.profiles.mine.scorers.speed: expected one of latency, latency-no-cache, nearest, "
     "least-load, prefix-affinity, prefix-cache, got 'speed'"),
    ({"gateway": {"routing_options": {"profiles": {"mine": {"picker": "best"}}}}},
     "gateway.routing_options.profiles.mine.picker: expected one of max-score, round-robin, random, p2c, got 'best'"),
    ({"discovery": {"kind": "consul"}}, "discovery.kind: expected one of static, etcd, got 'consul'"),
    ({"gateway": {"auth": {"keys": [{"id": "k", "sha256": "0" * 64, "priority": "gold"}]}}},
     "gateway.auth.keys[0].priority: expected one of contracted, on-demand, got 'gold'"),
])
def test_a_value_outside_its_closed_set_is_refused_naming_path_and_choices(data, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert str(e.value) == message


def test_a_profile_defined_in_config_may_be_named_and_is_read_only():
    cfg = config_from_dict({"gateway": {"routing": "mine", "routing_options": {
        "profiles": {"mine": {"scorers": {"latency": 1.0, "nearest": 0.2}}}}}})
    opts = cfg.gateway.routing_options
    assert cfg.gateway.routing == "mine" and dict(opts.profiles["mine"].scorers) == {"latency": 1.0, "nearest": 0.2}
    with pytest.raises(TypeError):
        opts.profiles["other"] = opts.profiles["mine"]  # type: ignore[index]
    with pytest.raises(TypeError):
        opts.profiles["mine"].scorers["latency"] = 2.0  # type: ignore[index]
    assert plugins.build_profile("mine", opts).name == "mine"


def test_config_names_match_what_routing_builds():
    """The closed sets config checks are exactly the plug-ins and profiles routing can build."""
    assert set(plugins.BUILTIN) == set(BUILTIN_PROFILES)
    for name in BUILTIN_PROFILES:
        filters, scorers, picker = plugins.BUILTIN[name]
        assert set(filters) <= set(ROUTING_FILTERS) and set(scorers) <= set(ROUTING_SCORERS)
        assert picker in ROUTING_PICKERS
    # every named plug-in builds (an unknown one would raise ValueError)
    opts = config_from_dict({"gateway": {"routing_options": {"profiles": {"all": {
        "filters": list(ROUTING_FILTERS), "scorers": dict.fromkeys(ROUTING_SCORERS, 1.0)}}}}}).gateway.routing_options
    for picker in ROUTING_PICKERS:
        opts2 = config_from_dict({"gateway": {"routing_options": {"profiles": {"p": {"picker": picker}}}}})
        assert plugins.build_profile("p", opts2.gateway.routing_options).name == "p"
    assert plugins.build_profile("all", opts).name == "all"


def test_priority_classes_are_the_wire_constants():
    hints = typing.get_type_hints(config_module.ApiKeyConfig)
    assert typing.get_args(hints["priority"]) == tuple(PRIORITIES)


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)
