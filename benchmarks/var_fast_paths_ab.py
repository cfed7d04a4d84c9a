"""A/B of VAR-d16's bf16 sampling fast paths in one process, interleaved (eager, fast, eager, fast), batch 16, latents
only: eager = KV cache by concatenation, full-sort top-p filter, fp32 residual stream, unfused MLP; fast = the
defaults (docs/performance.md). Random weights, built by benchmarks/profile_sampling.py.

    PYTHONPATH=src python benchmarks/var_fast_paths_ab.py
"""
import sys, time, contextlib, statistics
sys.argv = [sys.argv[0]]
import torch
sys.path.insert(0, "benchmarks")
from profile_sampling import build
import effigen.models.var as var_mod, effigen.samplers.tokens as tok
from effigen.nn.attention import LayerKVCache
from effigen.nn.layers import set_fused_inference
pipeline, extra = build("VAR-d16", 1)
net = pipeline.generator
fast_cache, fast_filter, fast_dtype = net.new_cache, tok.filter_logits, var_mod.inference_dtype
@contextlib.contextmanager
def eager():
    net.new_cache = lambda: [LayerKVCache() for _ in net.blocks]
    tok.filter_logits = tok.filter_logits_reference
    var_mod.inference_dtype = lambda m, x: x
    set_fused_inference(False)
    try: yield
    finally:
        del net.new_cache; set_fused_inference(True); tok.filter_logits = fast_filter; var_mod.inference_dtype = fast_dtype
B = 16; labels = torch.arange(B)
def run(): pipeline(labels, seed=0, batch_size=B, precision="bf16", **extra)
times = {"eager": [], "fast": []}
with eager(): run()
run()
for _ in range(2):
    for name in times:
        ctx = eager() if name == "eager" else contextlib.nullcontext()
        with ctx:
            t = time.perf_counter(); run(); times[name].append(time.perf_counter() - t)
    print({k: [round(x, 1) for x in v] for k, v in times.items()}, flush=True)
print("fast/eager speedup (median):", statistics.median(times["eager"]) / statistics.median(times["fast"]))
