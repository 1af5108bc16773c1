"""GPU check of the cuda runner's kernels (run by benchmarks/gpu_check.sh on a GPU machine).

    python -m benchmarks.gpu_check [--quick] [--json PATH] [--compare-source DIR]

Timings with CUDA events (median of repeats):
  copy       device-to-device copy bandwidth (the roofline for a memory-bound kernel),
  decode     our paged-attention decode at batch 64 x 2k context (fp16, 32 heads, 8 KV heads, D 128,
             block 16): achieved bandwidth over the K/V bytes it must read, vs copy and vs torch
             SDPA on contiguous K/V of the same shape; variants side by side (head grouping, split
             size, the .cu's build settings, another version of the kernel with --compare-source);
             then a sweep of other shapes and bf16,
  engine     end-to-end output tokens/s of the cuda vs torch runners at batch 64 on a Llama
             (hidden 2048, 16 layers, GQA 16/4, random weights made on the GPU: nothing downloaded),
             driven by the real scheduler and batch builder with greedy sampling.
Goals printed: decode >= 60% of copy bandwidth; cuda runner >= 1.5x torch runner.
Needs only torch and cuda-python (no tokenizer, safetensors or yaml: a missing yaml is stubbed,
the config loader is not used here). With --json it also draws a PNG beside it.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

try:
    import yaml  # noqa: F401  (gateway.config imports it at module level)
except ImportError:
    sys.modules["yaml"] = types.ModuleType("yaml")

DECODE_GOAL = 0.60
ENGINE_GOAL = 1.5


def time_ms(fn: Callable[[], Any], repeats: int = 10, inner: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of one fn call on the current stream, timed with CUDA events around
    `inner` back-to-back calls (so Python launch overhead overlaps the previous call's work)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs(num_bytes: int = 1 << 30) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / ms / 1e6  # read + write


class VariantLibrary:
    """The attention kernel compiled with other values of the .cu's #ifndef settings (build:
    "NUM_WARPS=4 STAGES=3 ...") or from another version of it (source_dir), launched by the real
    launcher code in place of kernels.launcher.library; other kernels go to the real library."""

    def __init__(self, build: str, source_dir: str | None = None):
        from kernels import launcher as K

        self.lib = K.library(torch.device("cuda"))
        settings = dict(kv.split("=") for kv in build.split())
        self.warps = int(settings.get("NUM_WARPS", K.NUM_WARPS)), int(settings.get("MMA_WARPS", K.MMA_WARPS))
        self.mma = settings.get("USE_MMA", "1") != "0"
        self.defines = "".join(f"#define {k} {v}\n" for k, v in settings.items())
        self.root = Path(source_dir) if source_dir else K.CSRC
        self.kernels: dict[str, Any] = {}

    def launch(self, file: str, name: str, grid: tuple[int, ...], block: int, *args: Any) -> None:
        from kernels import launcher as K

        if name.startswith("paged_attention_reduce") or not name.startswith("paged_attention"):
            return self.lib.launch(file, name, grid, block, *args)
        cc = self.lib.cc
        if not self.kernels:
            opts = cc.ProgramOptions(name=file, arch=self.lib.arch, std="c++17")
            obj = cc.Program(self.defines + K.load_source(file, self.root), "c++", options=opts).compile("cubin")
            self.module = cc.ObjectCode.from_cubin(bytes(obj.code))
        k = self.kernels.get(name) or self.kernels.setdefault(name, self.module.get_kernel(name))
        mma = self.mma and "float32" not in name and not name.endswith("_g1")  # paged_attention.cu's dispatch
        cc.launch(self.lib.stream(), cc.LaunchConfig(grid=grid, block=self.warps[mma] * 32), k, *args)


def decode_case(b: int, ctx: int, h: int = 32, kvh: int = 8, d: int = 128, bs: int = 16,
                variants: tuple[tuple[Any, ...], ...] = ((None, 512),), dt: torch.dtype = torch.float16) -> dict[str, Any]:
    """Our decode kernel at batch b x ctx tokens for each variant (head group, partition size
    [, build settings[, source dir]]) (group None: the launcher's choice; no build: the built-in),
    against torch SDPA on contiguous K/V of the same shape."""
    from kernels import launcher as K
    from kernels import reference as ref

    blocks_per_seq = ctx // bs
    num_blocks = b * blocks_per_seq
    cache = torch.randn(2, num_blocks, bs, kvh, d, dtype=dt, device="cuda")
    table = torch.randperm(num_blocks, device="cuda", dtype=torch.int64).view(b, blocks_per_seq).int()
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(b, h, d, dtype=dt, device="cuda")
    scale = d**-0.5
    kv_bytes = b * ctx * kvh * d * 2 * cache.element_size()  # K and V, read once at best
    expected = ref.paged_attention_decode(q, cache, table, seq_lens, scale).float()
    rows = []
    for group, part, *rest in variants:
        out = torch.full_like(q, float("nan"))

        def run() -> None:
            K.paged_attention(q, cache, table, seq_lens, scale, ctx, out=out, partition_size=part, group=group)

        real = K.library
        build, source = (list(rest) + [None, None])[:2]
        row = dict(group=K.head_group(h, kvh) if group is None else group, partition_size=part,
                   partitions=K.num_partitions(ctx, part), build=build or "built-in", source=source or "built-in")
        try:
            if build or source:
                variant = VariantLibrary(build or "", source)
                K.library = lambda device: variant  # type: ignore[assignment]
            ms = time_ms(run)
            row.update(kernel_ms=ms, kernel_gbs=kv_bytes / ms / 1e6,
                       max_abs_err_vs_reference=float((out.float() - expected).abs().max()))
            rows.append(row)
        except Exception as e:  # a variant that does not build (e.g. too much shared memory)
            print(f"  variant {row} failed: {type(e).__name__}: {e}", flush=True)
        finally:
            K.library = real  # type: ignore[assignment]
    k = torch.randn(b, kvh, ctx, d, dtype=dt, device="cuda")
    v = torch.randn_like(k)
    q4 = q.unsqueeze(2)  # (B, H, 1, D)
    sdpa_ms = time_ms(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True))
    first = rows[0]
    return dict(batch=b, context=ctx, heads=h, kv_heads=kvh, head_dim=d, block_size=bs, kv_bytes=kv_bytes,
                dtype=str(dt).removeprefix("torch."),
                kernel_ms=first["kernel_ms"], kernel_gbs=first["kernel_gbs"],
                max_abs_err_vs_reference=first["max_abs_err_vs_reference"], variants=rows,
                sdpa_contiguous_ms=sdpa_ms, sdpa_contiguous_gbs=kv_bytes / sdpa_ms / 1e6)


# The goal's case first (the launcher's defaults), then one head per block (the GQA K/V re-read
# the grouping avoids) and other split sizes; then other shapes with the defaults vs one head.
# The goal's case first (the launcher's defaults: fp16 on the tensor cores), then other head
# groupings, split sizes and builds (all on the CUDA cores: USE_MMA=0); then other shapes.
MAIN_VARIANTS = ((None, 512), (1, 512), (None, 1024), (None, 512, "MMA_STAGES=4"), (None, 512, "MMA_WARPS=4"),
                 (None, 512, "USE_MMA=0"))
SWEEP = ((64, 512, 32), (64, 8192, 32), (16, 2048, 32), (1, 8192, 32), (256, 1024, 32), (64, 2048, 64))


def decode_sweep() -> list[dict[str, Any]]:
    out = []
    for b, ctx, h in SWEEP:  # h 64 over 8 KV heads: 8 query heads per KV head (Llama-70B's ratio)
        variants = ((None, 512), (4, 512), (None, 512, "USE_MMA=0")) if h == 64 else ((None, 512), (None, 512, "USE_MMA=0"))
        out.append(decode_case(b, ctx, h=h, variants=variants))
        torch.cuda.empty_cache()
    out.append(decode_case(64, 2048, variants=((None, 512), (None, 512, "USE_MMA=0")), dt=torch.bfloat16))
    return out


# -- end to end -------------------------------------------------------------------------------
def llama_config(quick: bool) -> Any:
    from gateway.worker.model import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=4 if quick else 16, num_attention_heads=16,
                       num_key_value_heads=4, head_dim=128, max_position_embeddings=4096)


def make_torch_runner(mc: Any, cfg: Any, device: str = "cuda") -> Any:
    """A TorchRunner with random weights made on the GPU (TorchRunner itself loads a folder)."""
    from gateway.worker.model import LlamaForCausalLM
    from gateway.worker.runner import DTYPES, TorchRunner, _cos_sin

    torch.manual_seed(0)
    r = TorchRunner.__new__(TorchRunner)
    r.device, r.dtype, r.config = torch.device(device), DTYPES[cfg.dtype], mc
    with torch.device(device):
        model = LlamaForCausalLM(mc)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    r.model = model.to(r.dtype).eval()
    r.model.cos_sin = _cos_sin(mc).to(device)  # fp32, as TorchRunner keeps it
    shape = (2, cfg.num_blocks, cfg.block_size, mc.num_key_value_heads, mc.head_dim)
    r.kv_caches = [torch.zeros(shape, dtype=r.dtype, device=device) for _ in range(mc.num_hidden_layers)]
    return r


def drive(runner: Any, cfg: Any, num_requests: int, prompt_len: int, max_tokens: int) -> dict[str, float]:
    """Engine.step's loop without the tokenizer: schedule, build the batch, run, greedy sample."""
    from gateway.worker.batch import build_batch
    from gateway.worker.kv_cache import BlockManager
    from gateway.worker.request import Request, SamplingParams
    from gateway.worker.scheduler import Scheduler, SchedulerConfig

    kv = BlockManager(cfg.num_blocks, cfg.block_size, False)
    sched = Scheduler(SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len), kv)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(num_requests):
        sched.add(Request(f"r{i}", [rng.randrange(1000) for _ in range(prompt_len)], params))
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    sync()
    t0, steps, decode_s = time.perf_counter(), 0, 0.0
    while sched.has_work():
        ts = time.perf_counter()
        out = sched.schedule()
        batch = build_batch(out, cfg.block_size, runner.device)
        tokens = runner.execute(batch).argmax(-1).tolist()  # .tolist() syncs: the step is done
        sched.update(out, {r.request_id: t for r, t in zip(batch.sampling, tokens)})
        steps += 1
        if batch.num_decodes == batch.num_tokens:
            decode_s += time.perf_counter() - ts
    wall = time.perf_counter() - t0
    total = num_requests * max_tokens
    return dict(steps=steps, wall_s=wall, output_tokens_per_s=total / wall,
                decode_only_tokens_per_s=num_requests * (max_tokens - 1) / max(decode_s, 1e-9))


def engine_case(quick: bool) -> dict[str, Any]:
    from gateway.config import EngineConfig
    from gateway.worker.cuda_runner import CudaRunner

    b, prompt, new = 64, (64 if quick else 256), (32 if quick else 128)
    mc = llama_config(quick)
    cfg = EngineConfig(runner="cuda", device="cuda", dtype="float16", block_size=16,
                       num_blocks=b * (prompt + new) // 16 + 64, max_num_seqs=b,
                       max_num_batched_tokens=2048, max_model_len=1024)
    base = make_torch_runner(mc, cfg)
    cuda = CudaRunner.__new__(CudaRunner)
    cuda._setup(base, cfg, use_cuda_graphs=True)  # shares the weights and KV caches with `base`
    result: dict[str, Any] = dict(batch=b, prompt_tokens=prompt, output_tokens=new,
                                  layers=mc.num_hidden_layers, hidden=mc.hidden_size)
    for name, runner in (("cuda", cuda), ("torch", base)):
        drive(runner, cfg, b, prompt, 4)  # warm-up: kernels compile, decode graphs capture
        result[name] = drive(runner, cfg, b, prompt, new)
        print(f"  {name:6} {result[name]['output_tokens_per_s']:9.0f} output tok/s "
              f"(decode-only {result[name]['decode_only_tokens_per_s']:.0f})", flush=True)
    result["speedup"] = result["cuda"]["output_tokens_per_s"] / result["torch"]["output_tokens_per_s"]
    return result


def check_agreement() -> float:
    """Max |logit difference| of the cuda vs torch runners on one prefill + one decode step."""
    from gateway.config import EngineConfig
    from gateway.worker.cuda_runner import CudaRunner

    mc = llama_config(True)
    cfg = EngineConfig(device="cuda", dtype="float32", num_blocks=256, max_num_seqs=8, max_model_len=512)
    base = make_torch_runner(mc, cfg)
    cuda = CudaRunner.__new__(CudaRunner)
    cuda._setup(base, cfg, use_cuda_graphs=True)
    return max(drive_logits((base, cuda), cfg, n) for n in (2, 8))


def drive_logits(runners: tuple[Any, Any], cfg: Any, n: int) -> float:
    """Both runners on the same steps (prefill chunks, then graph decodes); max |logit diff|."""
    from gateway.worker.batch import build_batch
    from gateway.worker.kv_cache import BlockManager
    from gateway.worker.request import Request, SamplingParams
    from gateway.worker.scheduler import Scheduler, SchedulerConfig

    kv = BlockManager(cfg.num_blocks, cfg.block_size, False)
    sched = Scheduler(SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len), kv)
    rng = random.Random(n)
    for i in range(n):
        prompt = [rng.randrange(1000) for _ in range(rng.randrange(1, 200))]
        sched.add(Request(f"a{i}", prompt, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)))
    worst = 0.0
    while sched.has_work():
        out = sched.schedule()
        batch = build_batch(out, cfg.block_size, runners[0].device)
        la, lb = (r.execute(batch) for r in runners)
        worst = max(worst, float((la - lb).abs().max()))
        tokens = la.argmax(-1).tolist()
        sched.update(out, {r.request_id: t for r, t in zip(batch.sampling, tokens)})
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller engine model and workload")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--compare-source", metavar="DIR",
                    help="also time the decode kernel built from DIR/paged_attention.cu (another version)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    res: dict[str, Any] = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                               cuda=torch.version.cuda, errors={})
    compare = ((None, 512, None, args.compare_source),) if args.compare_source else ()
    stages: list[tuple[str, Callable[[], Any]]] = [
        ("copy_gbs", copy_bandwidth_gbs),
        ("decode", lambda: decode_case(64, 2048, variants=MAIN_VARIANTS + compare)),
        ("decode_sweep", decode_sweep),
        ("agreement_max_abs_logit_diff_fp32", check_agreement),
        ("engine", lambda: engine_case(args.quick)),
    ]
    for name, fn in stages:
        t0 = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            res[name] = fn()
        except Exception as e:  # keep going: one broken stage should not hide the others
            import traceback

            traceback.print_exc()
            res["errors"][name] = f"{type(e).__name__}: {e}"
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
        torch.cuda.empty_cache()
    report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        draw(res, args.json.removesuffix(".json") + ".png")
    return 1 if res["errors"] else 0


def report(res: dict[str, Any]) -> None:
    print(f"\ndevice {res['device']}  torch {res['torch']}  cuda {res['cuda']}")
    copy, dec, eng = res.get("copy_gbs"), res.get("decode"), res.get("engine")
    if copy:
        print(f"copy bandwidth            {copy:8.0f} GB/s")
    if dec:
        print(f"decode kernel (64 x 2k)   {dec['kernel_ms']:8.3f} ms  {dec['kernel_gbs']:6.0f} GB/s  "
              f"max |err| {dec['max_abs_err_vs_reference']:.2e}")
        print(f"torch SDPA contiguous     {dec['sdpa_contiguous_ms']:8.3f} ms  {dec['sdpa_contiguous_gbs']:6.0f} GB/s  "
              f"(kernel / SDPA time {dec['kernel_ms'] / dec['sdpa_contiguous_ms']:.2f}x)")
        if copy:
            frac = dec["kernel_gbs"] / copy
            res["decode_fraction_of_copy"] = frac
            ok = "MET" if frac >= DECODE_GOAL else "NOT MET"
            print(f"goal decode >= {DECODE_GOAL:.0%} of copy bandwidth: {frac:.0%} {ok}")
    cases = ([dec] if dec else []) + res.get("decode_sweep", [])
    if cases:
        print("\ndecode kernel, 8 KV heads, D 128, block 16 (GB/s of K/V read once; group = query heads a block)")
        print(f"{'dtype':>8} {'batch':>6} {'context':>8} {'heads':>6} {'group':>6} {'split':>6} "
              f"{'ms':>8} {'GB/s':>7} {'of copy':>8} {'max err':>9}  build")
        for c in cases:
            for v in c["variants"]:
                frac = f"{v['kernel_gbs'] / copy:.0%}" if copy else "-"
                build = " ".join(x for x in (v["build"], v["source"]) if x != "built-in") or "built-in"
                print(f"{c['dtype']:>8} {c['batch']:>6} {c['context']:>8} {c['heads']:>6} {v['group']:>6} "
                      f"{v['partition_size']:>6} {v['kernel_ms']:>8.3f} "
                      f"{v['kernel_gbs']:>7.0f} {frac:>8} {v['max_abs_err_vs_reference']:>9.1e}  {build}")
            print(f"{c['dtype']:>8} {c['batch']:>6} {c['context']:>8} {c['heads']:>6} {'SDPA':>6} {'-':>6} "
                  f"{c['sdpa_contiguous_ms']:>8.3f} "
                  f"{c['sdpa_contiguous_gbs']:>7.0f}")
    if "agreement_max_abs_logit_diff_fp32" in res:
        print(f"cuda vs torch runner max |logit diff| (fp32) {res['agreement_max_abs_logit_diff_fp32']:.2e}")
    if eng:
        ok = "MET" if eng["speedup"] >= ENGINE_GOAL else "NOT MET"
        print(f"engine b{eng['batch']}: cuda {eng['cuda']['output_tokens_per_s']:.0f} tok/s, torch "
              f"{eng['torch']['output_tokens_per_s']:.0f} tok/s")
        print(f"goal cuda runner >= {ENGINE_GOAL}x torch runner: {eng['speedup']:.2f}x {ok}")
    for name, err in res["errors"].items():
        print(f"ERROR in {name}: {err}")


def draw(res: dict[str, Any], path: str) -> None:
    """Decode bandwidth per case and variant against copy; engine tokens/s per runner."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    cases = ([res["decode"]] if res.get("decode") else []) + res.get("decode_sweep", [])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw=dict(width_ratios=[3, 1]))
    labels, vals, colors = [], [], []
    for c in cases:
        for v in c["variants"]:
            build = " ".join(x for x in (v["build"], v["source"]) if x != "built-in")
            labels.append(f"{c['dtype']} {c['batch']}x{c['context']}x{c['heads']}h g{v['group']} p{v['partition_size']}\n{build}")
            vals.append(v["kernel_gbs"])
            colors.append("tab:gray" if "USE_MMA=0" in v["build"] or v["source"] != "built-in" else "tab:blue")
        labels.append(f"{c['dtype']} {c['batch']}x{c['context']}x{c['heads']}h\nSDPA")
        vals.append(c["sdpa_contiguous_gbs"])
        colors.append("tab:orange")
    ax1.bar(range(len(vals)), vals, color=colors)
    ax1.set_xticks(range(len(vals)), labels, fontsize=6, rotation=90)
    ax1.set_ylabel("GB/s (K/V bytes read once / time)")
    if res.get("copy_gbs"):
        ax1.axhline(res["copy_gbs"], color="k", ls="--", lw=1, label="device copy")
        ax1.axhline(DECODE_GOAL * res["copy_gbs"], color="r", ls=":", lw=1, label=f"goal {DECODE_GOAL:.0%} of copy")
        ax1.legend(fontsize=7)
    ax1.set_title(f"paged-attention decode, fp16, {res['device']}", fontsize=9)
    eng = res.get("engine")
    if eng:
        ax2.bar(["cuda", "torch"], [eng["cuda"]["output_tokens_per_s"], eng["torch"]["output_tokens_per_s"]],
                color=["tab:blue", "tab:gray"])
        ax2.set_title(f"engine, batch {eng['batch']}: {eng['speedup']:.2f}x", fontsize=9)
        ax2.set_ylabel("output tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

