"""Wire constants that gateway and worker both speak: header names and priority classes. Defined
once here; every side imports them."""
from __future__ import annotations

REQUEST_ID_HEADER = "x-request-id"
LOAD_HEADER = "x-meshgate-load"  # a pool's compact load report, on every answer (core.types.LoadReport)
# Sent by a gateway on every attempt but its last: a pool whose batch is full (predicted wait
# beyond EngineConfig.refuse_queue_wait_s) may answer 429 at once so the request goes elsewhere.
# Without it a pool queues the request; direct clients are never refused, others ignore it.
MAY_REFUSE_HEADER = "x-meshgate-may-refuse"
PRIORITY_HEADER = "x-meshgate-priority"  # the key's priority class, set by the gateway for the pool
DEADLINE_HEADER = "x-meshgate-deadline-ms"
ROUTE_HEADER = "x-meshgate-route"  # the routing decision, explained
POOL_HEADER = "x-meshgate-pool"  # the pool that answered (not the first choice after a failover)
RESIDENCY_HEADER = "x-meshgate-residency"  # countries a request may be served in: DE,FR
SLO_HEADER = "x-meshgate-ttft-slo-ms"

# Priority classes, best first: the number is what schedulers sort by.
PRIORITIES = {"contracted": 0, "on-demand": 1}
SESSION_HEADER = "x-session-id"  # a session key for prefix-aware routing, after prompt_cache_key and user

# Continuation (issue 17). A gateway that may continue a stream elsewhere asks a meshgate pool for
# the token ids of each chunk: with this header set to 1, every stream chunk ends with the field
# TOKEN_IDS_FIELD (the ids of the tokens whose text the chunk carries); the gateway strips it.
TOKEN_IDS_HEADER = "x-meshgate-token-ids"
TOKEN_IDS_FIELD = "meshgate_token_ids"
# The body field of a continuation: {"output_token_ids": [...]} (or {"text": "..."} when the cut pool
# gave no ids): generation goes on as if the pool had produced those tokens itself (max_tokens counts
# them, stop strings span the join, a seeded sampler continues its random stream). Usage then counts
# the prompt once and every completion token, the resumed ones included.
RESUME_FIELD = "meshgate_resume"
HEDGE_HEADER = "x-meshgate-hedge"  # "off": never send this request to a second pool
