"""Time to encode one image with the shape-true Qwen3.5-0.8B vision tower (random weights) on this machine.

Each (size, dtype) case runs in a fresh process so its peak RSS is its own: build the tower, preprocess a real
photo resized to the size (scikit-image's astronaut), run the tower once to warm up, then time `--repeat` runs.
Prints a table and, last, one JSON line.

    .venv/bin/python benchmarks/bench_vision.py [--sizes 512 1024] [--dtypes float32 bfloat16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

# Qwen3.5-0.8B vision_config (qwen35-architecture.md section 3): depth 12, width 768, MLP 3072, 12 heads, out 1024.
VISION_08B = dict(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12, out_hidden_size=1024,
                  patch_size=16, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
                  hidden_act="gelu_pytorch_tanh")


def run_case(size: int, dtype_name: str, repeat: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from skimage.data import astronaut

    from qwen35.models.vision import VisionConfig, VisionModel
    from qwen35.vision import ImageProcessor

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    tower = VisionModel(VisionConfig.from_dict(VISION_08B, 1024)).to(dtype).eval()
    params = sum(p.numel() for p in tower.parameters())
    image = Image.fromarray(astronaut()).resize((size, size), Image.Resampling.BICUBIC)
    processor = ImageProcessor()
    t0 = time.perf_counter()
    processed = processor(image)
    preprocess_s = time.perf_counter() - t0
    with torch.inference_mode():
        tower(processed.pixel_values, [processed.grid])  # warm-up
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = tower(processed.pixel_values, [processed.grid])
            times.append(time.perf_counter() - t0)
    assert bool(torch.isfinite(out.float()).all())
    return {"size": size, "dtype": dtype_name, "patches": processed.pixel_values.shape[0],
            "image_tokens": processed.num_tokens, "params_m": round(params / 1e6, 1),
            "preprocess_ms": round(preprocess_s * 1e3, 1), "encode_s_median": round(float(np.median(times)), 3),
            "encode_s_min": round(min(times), 3), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # internal: one case in this process
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(int(args.case[0]), args.case[1], args.repeat)))
        return
    import torch

    results = []
    for dtype in args.dtypes:
        for size in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--case", str(size), dtype, "--repeat", str(args.repeat)],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    header = f"{'image':>10} {'dtype':>9} {'patches':>8} {'tokens':>7} {'preproc ms':>11} {'encode s':>9} {'peak RSS MiB':>13}"
    print(f"Qwen3.5-0.8B vision tower ({results[0]['params_m']}M params, random weights), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(header)
    for r in results:
        print(f"{r['size']:>5}x{r['size']:<4} {r['dtype']:>9} {r['patches']:>8} {r['image_tokens']:>7} "
              f"{r['preprocess_ms']:>11} {r['encode_s_median']:>9} {r['peak_rss_mib']:>13}")
    print(json.dumps({"benchmark": "vision_encode_0.8b", "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
