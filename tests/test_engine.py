"""Continuous batching: sequences that join and leave a running batch produce exactly what they produce alone."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB
from qwen35.runtime import Engine, Request, Scheduler, generate_tokens
from qwen35.loading import load_model
from qwen35.sampling import SamplingParams


@pytest.fixture(scope="module", params=["dense-tied", "moe-untied"])
def model(request, reference_checkpoint):
    return load_model(reference_checkpoint(request.param)[0], dtype=torch.float32)


def _prompts():
    g = torch.Generator().manual_seed(5)
    lengths, budgets = [3, 40, 300, 17, 90, 1], [10, 25, 5, 30, 12, 8]
    return [(f"s{i}", torch.randint(0, VOCAB, (n,), generator=g).tolist(), m)
            for i, (n, m) in enumerate(zip(lengths, budgets))]


def _run(engine: Engine, arrivals: dict[int, list]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    step = 0
    while engine.has_work() or any(k >= step for k in arrivals):
        for seq_id, prompt, budget in arrivals.pop(step, []):
            engine.add(Request(seq_id, prompt, SamplingParams(temperature=0, max_tokens=budget)))
        for event in engine.step():
            out.setdefault(event.seq_id, []).append(event.token)
        step += 1
    return out


def test_staggered_arrivals_match_each_sequence_alone(model):
    prompts = _prompts()
    arrivals = {0: prompts[:2], 3: prompts[2:4], 9: prompts[4:]}  # join while others are decoding
    engine = Engine(model, scheduler=Scheduler(max_running=4, prefill_chunk=64))
    got = _run(engine, arrivals)
    for seq_id, prompt, budget in prompts:
        alone = list(generate_tokens(model, prompt, SamplingParams(temperature=0, max_tokens=budget)))
        assert got[seq_id] == alone, seq_id
    assert engine.batch is None and not engine.scheduler.running


def test_abort_frees_the_row_and_spares_the_others(model):
    prompts = _prompts()[:3]
    engine = Engine(model, scheduler=Scheduler(prefill_chunk=512))
    for seq_id, prompt, _ in prompts:
        engine.add(Request(seq_id, prompt, SamplingParams(temperature=0, max_tokens=20)))
    out: dict[str, list[int]] = {}
    for _ in range(6):
        for e in engine.step():
            out.setdefault(e.seq_id, []).append(e.token)
    engine.abort("s1")
    assert [s.id for s in engine.scheduler.running] == ["s0", "s2"] and engine.batch.seen.shape == (2,)
    while engine.has_work():
        for e in engine.step():
            out.setdefault(e.seq_id, []).append(e.token)
    for seq_id, prompt, _ in (prompts[0], prompts[2]):
        assert out[seq_id] == list(generate_tokens(model, prompt, SamplingParams(temperature=0, max_tokens=20)))


def test_eos_and_limits(model):
    engine = Engine(model, eos_ids=range(VOCAB))  # every token is an EOS: one token each
    engine.add(Request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=50)))
    events = engine.step()
    assert [(e.seq_id, e.finish_reason) for e in events] == [("a", "stop")] and not engine.has_work()
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.add(Request("b", [], SamplingParams()))
    full = Engine(model, scheduler=Scheduler(max_waiting=1))
    full.add(Request("c", [1], SamplingParams()))
    with pytest.raises(OverflowError, match="queue is full"):
        full.add(Request("d", [1], SamplingParams()))


def test_a_failure_in_one_sequence_ends_that_sequence_alone(model, monkeypatch):
    """A prefill or sampling failure of one sequence ends it alone, with an error event: on its prompt, on its
    first token (prefilled, out of the waiting list, not yet in the batch) or mid-decode. The others go on and
    produce exactly what they produce alone."""
    import qwen35.runtime.engine as engine_module

    real_sample, real_prefill = engine_module.sample, engine_module.prefill_chunk
    culprits = {"first": 101, "later": 102, "prefill": 103}  # told apart by their seeds (greedy all the same)

    def sample(logits, generated, params, generator=None):
        if params.seed == culprits["first"] or (params.seed == culprits["later"] and len(generated) == 3):
            raise OverflowError("simulated overflow in sampling")
        return real_sample(logits, generated, params, generator)

    def prefill_chunk(model, ids, cache, start, end, images=None, capture=()):
        if ids.shape[1] == 17:  # the culprit's prompt length
            raise RuntimeError("simulated failure in the prompt's forward")
        return real_prefill(model, ids, cache, start, end, images, capture)

    monkeypatch.setattr(engine_module, "sample", sample)
    monkeypatch.setattr(engine_module, "prefill_chunk", prefill_chunk)
    g = torch.Generator().manual_seed(7)
    prompt = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    innocents = [(f"ok{i}", prompt(n)) for i, n in enumerate([5, 30, 9])]
    engine = Engine(model, scheduler=Scheduler(max_running=8, prefill_chunk=16))
    engine.add(Request(*innocents[0], SamplingParams(temperature=0, max_tokens=12)))
    engine.add(Request("first", prompt(6), SamplingParams(temperature=0, max_tokens=12, seed=culprits["first"])))
    engine.add(Request(*innocents[1], SamplingParams(temperature=0, max_tokens=12)))
    engine.add(Request("later", prompt(8), SamplingParams(temperature=0, max_tokens=12, seed=culprits["later"])))
    engine.add(Request("prefill", prompt(17), SamplingParams(temperature=0, max_tokens=12)))
    engine.add(Request(*innocents[2], SamplingParams(temperature=0, max_tokens=12)))
    out: dict[str, list] = {}
    while engine.has_work():
        for e in engine.step():
            out.setdefault(e.seq_id, []).append(e)
    for seq_id in culprits:
        assert out[seq_id][-1].finish_reason == "error" and "failed in the engine" in out[seq_id][-1].error
    assert len(out["first"]) == 1 and len(out["later"]) == 4 and len(out["prefill"]) == 1
    for seq_id, ids in innocents:
        alone = list(generate_tokens(model, ids, SamplingParams(temperature=0, max_tokens=12)))
        assert [e.token for e in out[seq_id]] == alone and out[seq_id][-1].finish_reason == "length", seq_id
    assert engine.batch is None and not engine.scheduler.running and not engine.scheduler.waiting


def test_a_prompt_alone_takes_the_idle_chunk_and_beside_decoding_streams_the_short_one():
    """`prefill_chunk` bounds what a step adds to running streams' latency; with none running there is nothing to
    stall, and every extra forward costs its fixed part."""
    from qwen35.runtime.scheduler import Sequence

    sched = Scheduler(prefill_chunk=64, idle_chunk=512)
    seq = Sequence(Request("a", list(range(600)), SamplingParams(max_tokens=4)))
    sched.add(seq)
    assert sched.chunk_end(seq) == 512
    sched.running.append(Sequence(Request("b", [1], SamplingParams(max_tokens=4))))
    assert sched.chunk_end(seq) == 64
    assert Scheduler(prefill_chunk=300, idle_chunk=0).idle_chunk == 300  # never below prefill_chunk
