"""The request pipeline both fronts share (DESIGN.md §2): admission, forwarding, metering, usage
log, tracing, the decision log, process supervision and discovery glue. The fronts (`api`, `rpc`)
import it; it imports `routing`, `pools`, `registry`, `core` and `config`, never a front."""
