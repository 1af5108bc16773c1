"""Round 2 of issue 16: the CPU engine table's modes (quick workload) and the scheduler
micro-benchmark (full size: 256 sequences, 300 steps) of the tree this process imports, as one JSON
line. Run alternately in this tree and in a worktree of the base commit (see RESULTS.md):

    PYTHONPATH=TREE python benchmarks/results/issue16/engine_paired_r2.py
"""
import json

import torch

from benchmarks.engine import FULL, QUICK, bench_scheduler, engine_config, make_specs, new_engine, output_tok_s, run_mode
from gateway.config import ModelConfig, TinyModelConfig

torch.set_num_threads(1)
w = QUICK
mc = ModelConfig(tiny=TinyModelConfig(train_steps=0))
cfg = engine_config(w, 1)
specs = make_specs(w, TinyModelConfig().vocab_size)
new_engine(mc, cfg, w, largest=True)
res = {}
for mode, g, pad in (("continuous", len(specs), False), ("static", w.max_num_seqs, True), ("sequential", 1, False)):
    res[mode] = output_tok_s(run_mode(new_engine(mc, cfg, w), specs, g, mode, pad_to_longest=pad))
s = bench_scheduler(FULL)
res.update({f"sched_{k}": v for k, v in s.items() if k != "num_running"})
print(json.dumps(res))
