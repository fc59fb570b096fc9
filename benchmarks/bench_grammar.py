"""Structured output's cost: grammar libraries on the real 248K Qwen3.5 vocabulary, then qwen35's grammar overhead
on a 0.8B int4 decode step.

1. Libraries (each where installed: llguidance, xgrammar, outlines-core): a seeded random walk through a JSON
   Schema (at each step: compute the allowed-token mask, mask 248,320 fp32 logits, take the best allowed token,
   advance), the same walk for each; per-token time (median, mean) and the schema's compile time. Why qwen35 uses
   llguidance is in `qwen35/runtime/grammar.py`.
2. Overhead in qwen35: the shape-true 0.8B int4 (`shape_true.py`, quantized as bench_multiturn does) decodes
   greedily with and without a JSON Schema; per token, the decode step's time and the grammar's own time
   (mask + advance, timed inside the engine's steering), and the end-to-end difference. Target: grammar time
   <= 5% of a decode step.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_grammar.py                # ~5 min here (first: +quantize)
    PYTHONPATH=src .venv/bin/python benchmarks/bench_grammar.py --skip-model   # libraries only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_multiturn import qwen35_dir  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}},
                         "address": {"type": "object", "required": ["city"],
                                     "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}}}}
VOCAB = 248320  # the model's (padded) vocabulary: the logits' length


def walk(start, mask, accept, finished, steps: int, seed: int) -> list[float]:
    """Per-token seconds of a random walk (restarted when the grammar completes)."""
    rng = np.random.default_rng(seed)
    noise = [torch.from_numpy(rng.standard_normal(VOCAB).astype(np.float32)) for _ in range(32)]
    state, times = start(), []
    for i in range(steps):
        logits = noise[i % 32].clone()
        t = time.perf_counter()
        logits = mask(state, logits)
        token = int(logits.numpy().argmax())
        accept(state, token)
        times.append(time.perf_counter() - t)
        if finished(state):
            state = start()
    return times


def llguidance_walk(tok_json: str, eos: int, steps: int) -> tuple[float, list[float]]:
    from qwen35.runtime.grammar import Matcher, Vocabulary

    vocab = Vocabulary(lambda: tok_json, VOCAB, eos)
    vocab.tokenizer  # noqa: B018 - built once per model, not per request: outside the timing
    t = time.perf_counter()
    grammar = vocab.compile("json", SCHEMA)
    compile_s = time.perf_counter() - t
    walk(lambda: Matcher(vocab, grammar), lambda m, x: m.mask(x), lambda m, k: m.accept(k), lambda m: m.finished,
         20, 1)  # warm the lexer's lazy states once, as a server's first request does
    return compile_s, walk(lambda: Matcher(vocab, grammar), lambda m, x: m.mask(x), lambda m, k: m.accept(k),
                           lambda m: m.finished, steps, 0)


def xgrammar_walk(tok, eos: int, steps: int) -> tuple[float, list[float]]:
    import xgrammar as xgr

    vocab = [""] * VOCAB
    for text, i in tok.get_vocab(with_added_tokens=True).items():
        vocab[i] = text
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=VOCAB,
                                                     stop_token_ids=[eos], add_prefix_space=False))
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - t
    bits = xgr.allocate_token_bitmask(1, VOCAB)

    def mask(m, logits):
        m.fill_next_token_bitmask(bits)
        xgr.apply_token_bitmask_inplace(logits, bits)
        return logits

    return compile_s, walk(lambda: xgr.GrammarMatcher(compiled), mask, lambda m, k: m.accept_token(k),
                           lambda m: m.is_terminated(), steps, 0)


def outlines_walk(tok, eos: int, steps: int) -> tuple[float, list[float]]:
    import outlines_core as oc
    from outlines_core.kernels.torch import allocate_token_bitmask, apply_token_bitmask_inplace, \
        fill_next_token_bitmask

    from qwen35.tokenizer.vocab import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    tokens: dict[bytes, list[int]] = {}
    for text, i in tok.get_vocab(with_added_tokens=False).items():
        if i != eos and all(c in to_byte for c in text):
            tokens.setdefault(bytes(to_byte[c] for c in text), []).append(i)
    t = time.perf_counter()
    index = oc.Index(oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA)), oc.Vocabulary(eos, tokens))
    compile_s = time.perf_counter() - t
    bits = allocate_token_bitmask(VOCAB)

    def mask(guide, logits):
        fill_next_token_bitmask(guide, bits)
        apply_token_bitmask_inplace(logits.unsqueeze(0), bits)
        return logits

    return compile_s, walk(lambda: oc.Guide(index), mask, lambda g, k: g.advance(k), lambda g: g.is_finished(),
                           steps, 0)


def libraries(steps: int) -> dict[str, dict[str, float]]:
    import tempfile

    from tokenizers import Tokenizer

    from qwen35.tokenizer.vocab import build_qwen35_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        build_qwen35_tokenizer(Path(tmp))
        tok_json = (Path(tmp) / "tokenizer.json").read_text()
    tok = Tokenizer.from_str(tok_json)
    eos = tok.token_to_id("<|im_end|>")
    out = {}
    for name, run in [("llguidance", lambda: llguidance_walk(tok_json, eos, steps)),
                      ("xgrammar", lambda: xgrammar_walk(tok, eos, steps)),
                      ("outlines-core", lambda: outlines_walk(tok, eos, steps))]:
        try:
            compile_s, times = run()
        except ImportError:
            print(f"  {name}: not installed, skipped")
            continue
        out[name] = {"compile_ms": compile_s * 1e3, "median_us": statistics.median(times) * 1e6,
                     "mean_us": statistics.fmean(times) * 1e6}
        print(f"  {name:14s} compile {compile_s * 1e3:8.1f} ms   per token: median {out[name]['median_us']:8.0f} us"
              f"   mean {out[name]['mean_us']:8.0f} us", flush=True)
    return out


def overhead(cache: Path, tokens: int, threads: int) -> dict[str, float]:
    """0.8B int4 greedy decode with and without a JSON Schema, through the Python API."""
    import qwen35
    from qwen35.runtime import steering

    torch.set_num_threads(threads)
    model = qwen35.load(qwen35_dir("0.8B", "int4", cache), cache_ram=0)
    grammar_s: list[float] = []
    mask, accept = steering.Steer.mask, steering.Steer.accept

    def timed(f):
        def wrapper(self, *a):
            t = time.perf_counter()
            try:
                return f(self, *a)
            finally:
                if self.matcher is not None:
                    grammar_s.append(time.perf_counter() - t)
        return wrapper

    steering.Steer.mask, steering.Steer.accept = timed(mask), timed(accept)
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "bio": {"type": "string"}},
              "required": ["name", "bio"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    model.chat(messages, response_format=fmt, max_tokens=4, temperature=0, enable_thinking=False)  # warm-up
    result = {}
    for label, options in [("plain", {}), ("json_schema", {"response_format": fmt})]:
        grammar_s.clear()
        start, n = None, 0
        for piece in model.stream_chat(messages, max_tokens=tokens, temperature=0, enable_thinking=False,
                                       ignore_eos=True, **options):
            if start is None:
                start = time.perf_counter()  # after the prefill and the first token
            n = piece.completion_tokens or n
        step = (time.perf_counter() - start) / max(n - 1, 1)
        result[f"{label}_ms_per_token"] = step * 1e3
        result[f"{label}_tokens"] = n
        if grammar_s:
            result["grammar_ms_per_token"] = statistics.fmean(grammar_s) * 1e3
        print(f"  0.8B int4 {label:12s} {n:4d} tokens, {step * 1e3:7.1f} ms/token"
              + (f", grammar {result['grammar_ms_per_token']:.2f} ms/token" if grammar_s else ""), flush=True)
    result["grammar_share_of_step"] = result["grammar_ms_per_token"] / result["plain_ms_per_token"]
    result["end_to_end_overhead"] = result["json_schema_ms_per_token"] / result["plain_ms_per_token"] - 1
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="tokens of each library walk")
    p.add_argument("--tokens", type=int, default=120, help="decode tokens of each 0.8B run")
    p.add_argument("--skip-model", action="store_true", help="libraries only")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "qwen35-bench"))
    args = p.parse_args()
    print("grammar libraries, JSON Schema walk on the 248K Qwen3.5 vocabulary")
    report = {"libraries": libraries(args.steps)}
    if not args.skip_model:
        print("qwen35 grammar overhead, 0.8B int4 decode")
        report["overhead"] = overhead(Path(args.cache), args.tokens, args.threads)
        share = report["overhead"]["grammar_share_of_step"]
        print(f"  grammar time = {share:.1%} of a decode step (target <= 5%): {'met' if share <= 0.05 else 'NOT met'}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
