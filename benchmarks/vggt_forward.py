"""Frozen VGGT aggregator forward: time per sample, peak memory and achieved TFLOP/s.

    python benchmarks/vggt_forward.py                 # tiny config on CPU (+ VGGT-1B bf16 when a GPU is present)
    python benchmarks/vggt_forward.py --vggt-1b-cpu   # also the random-init VGGT-1B in fp32 on CPU at 224

FLOPs are the analytic forward FLOPs (2 per multiply-accumulate) of the blocks, the patchify and attention.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from atlas_vla.models.vggt import DinoConfig, VGGTAggregator, VGGTConfig

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense tensor-core peaks


def forward_flops(config: VGGTConfig, frames: int, size: int) -> float:
    """Analytic forward FLOPs of one sample of `frames` square images of side `size`."""
    patches = (size // config.patch_size) ** 2

    def blocks(dim: int, depth: int, mlp_ratio: float, tokens: int, attended: int) -> float:
        linear = 2 * tokens * dim * dim * (3 + 1 + 2 * mlp_ratio)  # qkv, proj, mlp
        attention = 2 * 2 * tokens * attended * dim  # q @ k^T and attn @ v
        return depth * (linear + attention)

    dino = config.dino
    dino_tokens = 1 + dino.num_register_tokens + patches
    flops = frames * 2 * patches * dino.embed_dim * 3 * config.patch_size**2  # patchify conv
    flops += frames * blocks(dino.embed_dim, dino.depth, dino.mlp_ratio, dino_tokens, dino_tokens)
    tokens = config.patch_start_idx + patches
    flops += frames * blocks(config.embed_dim, config.depth, config.mlp_ratio, tokens, tokens)  # frame attention
    flops += blocks(config.embed_dim, config.depth, config.mlp_ratio, frames * tokens, frames * tokens)  # global
    return flops


def measure(model: VGGTAggregator, batch: int, frames: int, size: int, device: str, repeats: int) -> dict:
    images = torch.rand(batch, frames, 3, size, size, device=device)
    model.encode(images)  # warm-up (kernels, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        model.encode(images)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    tflops = forward_flops(model.config, frames, size) * batch / seconds / 1e12
    if device == "cuda":
        return {"s/sample": seconds / batch, "peak GiB": torch.cuda.max_memory_allocated() / 2**30, "TFLOP/s": tflops}
    # On CPU the process's peak resident memory so far (it only grows, so run the big model last).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"s/sample": seconds / batch, "process peak RSS GiB": rss, "TFLOP/s": tflops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vggt-1b-cpu", action="store_true", help="also time VGGT-1B (fp32, random init) on CPU at 224")
    args = parser.parse_args()
    tiny = VGGTConfig(embed_dim=64, depth=2, num_heads=4, dino=DinoConfig(embed_dim=64, depth=2, num_heads=4))
    rows = []
    model = VGGTAggregator(tiny).init_weights().freeze()
    for size in (224, 518):
        rows.append(("tiny", "cpu fp32", size, measure(model, 1, 2, size, "cpu", args.repeats)))
    if args.vggt_1b_cpu:
        big = VGGTAggregator(VGGTConfig()).init_weights().freeze()
        rows.append(("VGGT-1B", "cpu fp32", 224, measure(big, 1, 2, 224, "cpu", 1)))
    if torch.cuda.is_available():
        big = VGGTAggregator(VGGTConfig()).init_weights().freeze().cuda()
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        for size in (224, 518):
            result = measure(big, 8, 2, size, "cuda", args.repeats)
            if peak:
                result["% bf16 peak"] = 100 * result["TFLOP/s"] / peak
            rows.append(("VGGT-1B", f"{name} bf16", size, result))
    print(f"{'model':8} {'device':22} {'size':>5}  metrics (S=2 frames)")
    for model_name, device, size, result in rows:
        metrics = "  ".join(f"{k} {v:.4g}" for k, v in result.items())
        print(f"{model_name:8} {device:22} {size:>5}  {metrics}")
    print(f"analytic forward FLOPs, VGGT-1B, S=2: 224 -> {forward_flops(VGGTConfig(), 2, 224) / 1e12:.2f} T, "
          f"518 -> {forward_flops(VGGTConfig(), 2, 518) / 1e12:.2f} T")


if __name__ == "__main__":
    main()
