"""The etcd registry (DESIGN.md §1): pools and gateways register under a lease; gateways list and
watch the prefix. Imports gateway.core and gateway.config only; aetcd is imported lazily so that a
gateway with static discovery installs without the `etcd` extra."""
from __future__ import annotations

from gateway.registry.records import GatewayRecord, PoolRecord, pool_record, site_of
from gateway.registry.registrant import Registrant
from gateway.registry.view import RegistryView

__all__ = ["GatewayRecord", "PoolRecord", "Registrant", "RegistryView", "pool_record", "site_of"]
