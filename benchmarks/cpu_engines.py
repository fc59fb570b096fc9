"""The engines `bench_cpu.py` measures: how each loads a shape-true checkpoint (making its own artifact once:
a `qwen35 quantize` directory, a llama.cpp GGUF), prefills and decodes. Each runs in its own worker process."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

# what an engine hands the worker: prefill(n) -> seconds, start() -> (time to first token, step), load s, weight bytes
Hooks = tuple[Callable[[int], float], Callable[[], tuple[float, Callable[[], None]]], float, int]

QUANTIZE = {"int8": ["--bits", "8", "--head"], "int4": ["--bits", "4", "--head"],  # int8 head and embedding
            "int4h4": ["--bits", "4", "--head", "4"],  # int4 head: the smallest (quality: quant_quality.py)
            "int4g128h4": ["--bits", "4", "--group-size", "128", "--head", "4"]}  # half the scales and zeros
LLAMA_SRC = "llama-cpp-python==0.3.36"


def engine_hooks(engine: str, size: str, args: argparse.Namespace) -> Hooks:
    """Load `engine` (`family-variant`, e.g. qwen35-int4, llama-Q4_0) on the `size` checkpoint in args.cache."""
    ckpt = Path(args.cache) / size
    family, variant = engine.split("-", 1)
    if family == "qwen35":
        return qwen35_hooks(ckpt, variant, args)
    if family == "gguf":  # qwen35 running llama.cpp's own GGUF file, the one llama-<variant> runs
        return qwen35_hooks(gguf_file(ckpt, variant, args), "gguf", args)
    if family == "transformers":
        return transformers_hooks(ckpt, args)
    return llama_hooks(ckpt, variant, args)


def prepared(engine: str, size: str, cache: Path) -> bool:
    """Whether `engine` can run without the bf16 checkpoint being written (its quantized artifact exists)."""
    family, variant = engine.split("-", 1)
    if family == "qwen35" and variant != "bf16":
        return (cache / f"{size}-{variant}" / "config.json").exists()
    return family in ("llama", "gguf") and (cache / f"{size}-{variant}.gguf").exists()


def qwen35_hooks(ckpt: Path, variant: str, args: argparse.Namespace) -> Hooks:
    import torch

    import qwen35
    from qwen35.cache import make_cache
    from qwen35.runtime.prefill import prefill
    from qwen35.sampling import greedy

    if variant not in ("bf16", "gguf"):  # the quantized checkpoint is its own artifact, made by `qwen35 quantize`
        qdir = Path(args.cache) / f"{ckpt.name}-{variant}"
        if not (qdir / "config.json").exists():  # in its own process: its memory is not this one's peak
            subprocess.run([sys.executable, "-m", "qwen35", "quantize", str(ckpt), str(qdir), "--group-size", "64",
                            *QUANTIZE[variant]], check=True)
        ckpt = qdir
    start = time.perf_counter()
    m = qwen35.load(ckpt, dtype="bfloat16", device="cpu", compile=args.compile)
    load_s = time.perf_counter() - start
    model = m.model

    def run_prefill(n: int) -> float:
        ids = torch.randint(1000, 200000, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.inference_mode():
            start = time.perf_counter()
            prefill(model, ids, make_cache(model.config))
            return time.perf_counter() - start

    def start_decode():
        """(time to first token of a 512-token prompt, a function that decodes one more token)."""
        ids = torch.randint(1000, 200000, (1, 512), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            cache = make_cache(model.config)
            start = time.perf_counter()
            token = torch.tensor([[greedy(prefill(model, ids, cache)[0])]])
            ttft = time.perf_counter() - start

        @torch.inference_mode()
        def step() -> None:  # the library's own greedy step (as generate_tokens does)
            nonlocal token
            token = torch.tensor([[greedy(model(token, cache)[0, -1])]])
        return ttft, step

    return run_prefill, start_decode, load_s, weight_bytes_qwen35(model)


def weight_bytes_qwen35(model) -> int:
    """Bytes one decode step reads: every parameter and buffer once, less an untied embedding (one row read)."""
    seen, total = set(), 0
    table = model.embed_tokens
    skip = set() if model.config.tie_word_embeddings else {id(t) for t in [*table.parameters(), *table.buffers()]}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and id(t) not in skip:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def transformers_hooks(ckpt: Path, args: argparse.Namespace) -> Hooks:
    import torch
    import transformers as tf

    start = time.perf_counter()
    model = tf.AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - start
    text = model.model.language_model
    tied = model.config.text_config.tie_word_embeddings
    weight = sum(p.numel() * p.element_size() for n, p in text.named_parameters() if tied or "embed" not in n)
    weight += 0 if tied else model.lm_head.weight.numel() * 2

    def run_prefill(n: int) -> float:
        ids = torch.randint(1000, 200000, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.inference_mode():
            start = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start

    def start_decode():
        ids = torch.randint(1000, 200000, (1, 512), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ttft, past = time.perf_counter() - start, out.past_key_values

        @torch.inference_mode()
        def step() -> None:
            nonlocal token, past
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            token, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
        return ttft, step

    return run_prefill, start_decode, load_s, weight


def llama_hooks(ckpt: Path, quant: str, args: argparse.Namespace) -> Hooks:
    import llama_cpp

    gguf = gguf_file(ckpt, quant, args)
    start = time.perf_counter()
    llm = llama_cpp.Llama(str(gguf), n_ctx=max(*args.prefill, 512 + args.decode) + 64, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - start

    def run_prefill(n: int) -> float:
        llm.reset()
        ids = [1000 + (i * 7919) % 199000 for i in range(n)]
        start = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - start

    def start_decode():
        llm.reset()
        start = time.perf_counter()
        llm.eval([1000 + (i * 7919) % 199000 for i in range(512)])
        token = llm.sample(temp=0.0)
        ttft = time.perf_counter() - start

        def step() -> None:
            nonlocal token
            llm.eval([token])
            token = llm.sample(temp=0.0)
        return ttft, step

    return run_prefill, start_decode, load_s, gguf_weight_bytes(gguf)


def gguf_file(ckpt: Path, quant: str, args: argparse.Namespace) -> Path:
    """The checkpoint in GGUF: converted by llama.cpp's converter (F16), then quantized by the library."""
    import llama_cpp

    src = llama_source(Path(args.cache))
    f16 = Path(args.cache) / f"{ckpt.name}-F16.gguf"
    out = Path(args.cache) / f"{ckpt.name}-{quant}.gguf"
    if out.exists():  # made by an earlier run (the F16 it came from may have been deleted: 8 GB at 4B)
        return out
    if not f16.exists():
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", "f16",
                        "--no-mtp", "--outfile", str(f16)], check=True, env=env, stdout=subprocess.DEVNULL)
    if quant != "F16":
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
        params.nthread = args.threads
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {f16} to {quant}")
    return out


def llama_source(cache: Path) -> Path:
    """llama.cpp as vendored by the llama-cpp-python source distribution (its converter, gguf-py and sources),
    extracted whole: the test suite extracts only the converter into the same folder (tests/gguf_reference.py)."""
    root = cache / "src"
    found = sorted(p.parent for p in root.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if not found:
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        LLAMA_SRC, "-d", str(root)], check=True)
        for archive in root.glob("llama_cpp_python-*.tar.gz"):
            subprocess.run(["tar", "xzf", str(archive), "-C", str(root)], check=True)
        found = sorted(p.parent for p in root.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    return found[-1]


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of the tensors one decode step reads (all but an untied token embedding)."""
    sys.path.insert(0, str(llama_source(path.parent) / "gguf-py"))
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    untied = "output.weight" in tensors
    return sum(n for name, n in tensors.items() if not (untied and name == "token_embd.weight"))
