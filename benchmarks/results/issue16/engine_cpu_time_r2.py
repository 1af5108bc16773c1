"""Round 2 of issue 16: the quick engine workload's continuous and one-at-a-time modes, reporting
the process's CPU time per output token beside wall tok/s (on a shared machine CPU time is far less
swayed by other processes than wall time). One JSON line; run alternately in two trees:

    PYTHONPATH=TREE python benchmarks/results/issue16/engine_cpu_time_r2.py
"""
import json
import time

import torch

from benchmarks.engine import QUICK, engine_config, make_specs, new_engine, output_tok_s, run_mode
from gateway.config import ModelConfig, TinyModelConfig

torch.set_num_threads(1)
w = QUICK
mc = ModelConfig(tiny=TinyModelConfig(train_steps=0))
cfg = engine_config(w, 1)
specs = make_specs(w, TinyModelConfig().vocab_size)
new_engine(mc, cfg, w, largest=True)
res = {}
for mode, g in (("continuous", len(specs)), ("sequential", 1)):
    engine = new_engine(mc, cfg, w)
    c0 = time.process_time()
    run = run_mode(engine, specs, g, mode)
    cpu_s = time.process_time() - c0
    res[mode] = output_tok_s(run)
    res[mode + "_cpu_us_per_token"] = 1e6 * cpu_s / sum(n for _, n in specs)
    res[mode + "_steps"] = run.num_steps
print(json.dumps(res))
