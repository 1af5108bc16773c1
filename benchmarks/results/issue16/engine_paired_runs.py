import json, torch
from benchmarks.engine import QUICK, make_specs, engine_config, new_engine, run_mode, output_tok_s
from gateway.config import ModelConfig, TinyModelConfig
torch.set_num_threads(1)
w = QUICK
mc = ModelConfig(tiny=TinyModelConfig(train_steps=0))
cfg = engine_config(w, 1)
specs = make_specs(w, TinyModelConfig().vocab_size)
new_engine(mc, cfg, w, largest=True)
res = {}
for mode, g in (("continuous", len(specs)), ("sequential", 1)):
    run = run_mode(new_engine(mc, cfg, w), specs, g, mode)
    res[mode] = output_tok_s(run)
print(json.dumps(res))
