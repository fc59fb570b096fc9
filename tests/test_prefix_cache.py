"""Prefix reuse: a prompt resumed from a snapshot computes what a cold prompt computes (fp32 logits within 1e-5,
identical greedy text) for dense, MoE, int4 and image prompts, under a budget that evicts, beside a batch, and
after a failure; conversations through the official template hit with thinking off, on and with tools."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from conftest import VOCAB
from qwen35.cache import KVCache, make_cache
from qwen35.loading import load_model
from qwen35.quant import quantize
from qwen35.runtime import Engine, PrefixCache, Request, Scheduler, generate_tokens, run
from qwen35.runtime.prefill import prefill, prefill_chunk
from qwen35.runtime.prefix_cache import EVERY, snapshot_points
from qwen35.sampling import SamplingParams
from test_vision_model import IMAGE, START, encode, prompt_with, vl  # noqa: F401 - vl is a fixture

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
GIB = 1 << 30


@pytest.fixture(scope="module", params=["dense-tied", "moe-untied", "dense-int4"])
def model(request, reference_checkpoint):
    m = load_model(reference_checkpoint(request.param.replace("-int4", "-tied"))[0], dtype=torch.float32)
    return quantize(m, bits=4, group_size=32) if request.param.endswith("int4") else m


def _random(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _resumed_logits(model, cache: PrefixCache, prompt: list[int]) -> tuple[int, torch.Tensor]:
    position, state = cache.restore(prompt, ())
    assert state is not None, "expected a snapshot on this prefix"
    with torch.inference_mode():
        return position, prefill_chunk(model, torch.tensor([prompt]), state, position, len(prompt))[0][0, -1]


def _cold_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return prefill(model, torch.tensor([prompt]), make_cache(model.config, 1))[0]


def test_resumed_prompt_matches_cold_logits_and_greedy_text(model):
    cache = PrefixCache(GIB)
    first = _random(90, 1)
    reply = [e.token for e in run(model, Request("a", first, GREEDY, marks=(40,)), prefix_cache=cache)]
    assert set(cache.lengths()) == {40, 90, 90 + len(reply) - 1}  # marks, prompt end, reply end
    follow = first + reply + _random(30, 2)  # the next turn extends the reply
    position, got = _resumed_logits(model, cache, follow)
    assert position == 90 + len(reply) - 1
    torch.testing.assert_close(got, _cold_logits(model, follow), atol=1e-5, rtol=0)
    events = list(run(model, Request("b", follow, GREEDY), prefix_cache=cache))
    assert events[0].cached == position
    assert [e.token for e in events] == list(generate_tokens(model, follow, GREEDY))
    other = first[:40] + _random(25, 3)  # shares only the marked prefix, captured inside the first forward
    position, got = _resumed_logits(model, cache, other)
    assert position == 40
    torch.testing.assert_close(got, _cold_logits(model, other), atol=1e-5, rtol=0)


def test_a_restored_state_is_planned_for_the_context(model):
    """A restore copies K/V once, into buffers of the planned context: the next prefill writes into them in place."""
    cache = PrefixCache(GIB)
    prompt = _random(50, 4)
    list(run(model, Request("a", prompt, GREEDY), prefix_cache=cache))
    follow = prompt + _random(20, 5)
    position, state = cache.restore(follow, (), context=128)
    kv = [layer for layer in state.layers if isinstance(layer, KVCache)]
    assert kv and all(layer.k.shape[2] == 129 and layer.length == position for layer in kv)
    buffers = [layer.k.data_ptr() for layer in kv]
    with torch.inference_mode():
        got = prefill_chunk(model, torch.tensor([follow]), state, position, len(follow))[0][0, -1]
    assert [layer.k.data_ptr() for layer in kv] == buffers
    torch.testing.assert_close(got, _cold_logits(model, follow), atol=1e-5, rtol=0)


def test_a_restore_copies_into_a_retired_sequences_buffers(model):
    """K/V buffers given back to the pool take the next restore's copy (new ones fault their pages in afresh), and
    what the earlier, longer sequence left in the slots past the restored ones changes nothing."""
    cache = PrefixCache(GIB)
    prompt = _random(40, 8)
    list(run(model, Request("a", prompt, GREEDY), prefix_cache=cache, context=128))
    follow = prompt + _random(30, 9)
    _, first = cache.restore(follow, (), context=128)
    with torch.inference_mode():  # fill slots past the snapshot, as a longer sequence would have
        prefill_chunk(model, torch.tensor([follow]), first, 40, 70)
    buffers = [layer.k.data_ptr() for layer in first.layers if isinstance(layer, KVCache)]
    cache.pool.give(first)
    del first
    position, state = cache.restore(follow[:60], (), context=128)
    assert position == 40 and [layer.k.data_ptr() for layer in state.layers if isinstance(layer, KVCache)] == buffers
    with torch.inference_mode():  # 20 rows: see the warm-up test below
        got = prefill_chunk(model, torch.tensor([follow[:60]]), state, position, 60)[0][0, -1]
    torch.testing.assert_close(got, _cold_logits(model, follow[:60]), atol=1e-5, rtol=0)
    list(run(model, Request("b", follow, GREEDY), prefix_cache=cache, context=128))
    held = []  # a prompt with no snapshot grows new buffers: the pool must not keep b's beside them
    list(run(model, Request("c", _random(30, 11), GREEDY, progress=lambda done, total: held.append(len(cache.pool))),
             prefix_cache=cache, context=128))
    assert held == [0] and len(cache.pool) > 0  # cleared while c ran; c's buffers given back after


def test_a_one_token_reply_still_saves_its_prompt_states(model):
    """Snapshots are copied the step after their forward; a reply that ends at its first token has no such step."""
    cache, prompt = PrefixCache(GIB), _random(30, 60)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    assert len(list(run(model, Request("a", prompt, one, marks=(12,)), prefix_cache=cache))) == 1
    assert set(cache.lengths()) == {12, 30}


def test_a_warmed_reply_matches_cold_and_a_failed_warm_up_ends_nothing(model, caplog):
    """The followup (the reply as history renders it) is prefilled after the reply, in the background of `run`;
    the next turn resumes at its end with cold logits. A followup that raises is logged and changes nothing."""
    cache, first = PrefixCache(GIB), _random(70, 4)
    # stands for the reply re-rendered (not the ids generated); 16 tokens: MKL's fp32 GEMM rounds chunks of up to
    # ~12 rows another way on Intel Xeons (up to 1.6e-5 a product at K = 256), which alone put this MoE's logits
    # 1.01e-5 from cold with 9
    rendered = first + _random(16, 5)
    jobs = []
    events = list(run(model, Request("a", first, GREEDY, followup=lambda reply, stops: rendered),
                      prefix_cache=cache, background=jobs.append))
    assert events[-1].finish_reason == "length" and len(jobs) == 1 and len(rendered) not in cache.lengths()
    jobs[0](threading.Event())
    assert len(rendered) in cache.lengths() and cache.stats.warmed_tokens == 16
    follow = rendered + _random(20, 6)
    position, got = _resumed_logits(model, cache, follow)
    assert position == len(rendered)
    torch.testing.assert_close(got, _cold_logits(model, follow), atol=1e-5, rtol=0)

    def broken(reply, stops):
        raise RuntimeError("template failed")

    jobs.clear()
    events = list(run(model, Request("b", first, GREEDY, followup=broken), prefix_cache=cache,
                      background=jobs.append))
    assert len(events) == GREEDY.max_tokens and not jobs and "template failed" in caplog.text


@pytest.mark.parametrize("room", [3.5, 0.5])
def test_a_budget_that_evicts_changes_no_result(model, room):
    """room: the budget in snapshots; 3.5 keeps the shared prefix while every other snapshot is evicted, 0.5
    stores nothing."""
    prompts = [_random(60, 10) + _random(n, 11 + n) for n in (5, 9, 14, 20)]
    one = PrefixCache(GIB)
    list(run(model, Request("x", prompts[0], GREEDY, marks=(60,)), prefix_cache=one))
    tiny = PrefixCache(int(room * one.nbytes / len(one)))
    for i, prompt in enumerate(prompts * 2):
        got = [e.token for e in run(model, Request(str(i), prompt, GREEDY, marks=(60,)), prefix_cache=tiny)]
        assert got == list(generate_tokens(model, prompt, GREEDY))
        assert tiny.nbytes <= tiny.budget
    stats = tiny.stats
    assert (stats.evictions > 0 and stats.hits == 7) if room > 1 else (stats.stored == 0 and stats.hits == 0)


def test_a_batch_with_snapshots_stays_batch_invariant(model):
    system = _random(70, 20)
    prompts = {f"s{i}": system + _random(3 + 7 * i, 30 + i) for i in range(5)}
    engine = Engine(model, scheduler=Scheduler(max_running=4, prefill_chunk=16), prefix_cache=PrefixCache(GIB))
    for seq_id, prompt in prompts.items():
        engine.add(Request(seq_id, prompt, GREEDY, marks=(70,)))
    got: dict[str, list[int]] = {k: [] for k in prompts}
    cached: dict[str, int] = {}
    while engine.has_work():
        for event in engine.step():
            got[event.seq_id].append(event.token)
            cached[event.seq_id] = event.cached
    assert got == {k: list(generate_tokens(model, p, GREEDY)) for k, p in prompts.items()}
    assert cached["s0"] == 0 and all(cached[k] == 70 for k in list(prompts)[1:])  # the shared system prompt


def test_a_failed_prefill_leaves_no_partial_snapshot(model, monkeypatch):
    cache = PrefixCache(GIB)
    engine = Engine(model, scheduler=Scheduler(prefill_chunk=32), prefix_cache=cache)
    prompt = _random(100, 40)
    real, calls = type(model).features, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # chunks [0, 32) and [32, 64) (the mark at 50 captured) are in; [64, 96) fails
            raise RuntimeError("injected")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "features", failing)
    engine.add(Request("f", prompt, GREEDY, marks=(50, 90)))
    events = [e for _ in range(5) for e in engine.step()]
    assert events[-1].finish_reason == "error" and not engine.has_work()
    assert set(cache.lengths()) == {50}  # the one point passed before the failure
    monkeypatch.setattr(type(model), "features", real)
    got = list(run(model, Request("g", prompt, GREEDY), prefix_cache=cache))
    assert got[0].cached == 50 and [e.token for e in got] == list(generate_tokens(model, prompt, GREEDY))


def test_states_that_are_not_finite_are_never_stored(model):
    cache = PrefixCache(GIB)
    state = make_cache(model.config, 1)
    with torch.inference_mode():
        prefill(model, torch.tensor([_random(20, 50)]), state)
        next(layer for layer in state.layers if hasattr(layer, "state")).state[0, 0, 0, 0] = float("nan")
    assert not cache.store(_random(20, 50), (), state) and len(cache) == 0


def test_snapshot_points_cover_marks_every_and_the_end():
    assert snapshot_points(3000, (17, 2999, 5000), 0) == [17, EVERY, 2 * EVERY, 2999, 3000]
    assert snapshot_points(3000, (17,), 1500) == [2 * EVERY, 3000]
    assert snapshot_points(2105, (2101,), 2010) == [2101, 2105]  # 2,048 is no point 38 tokens into the prefill
    assert snapshot_points(2 * EVERY + 10, (), 0) == [EVERY, 2 * EVERY + 10]  # nor 10 tokens before its end


def test_an_image_in_the_prefix_is_part_of_the_key(vl):  # noqa: F811
    _, model, vision, _ = vl
    grids = [(1, 6, 4)]
    ids = prompt_with(grids)
    cat, dog = (dataclasses.replace(encode(vision, ids, grids, seed=s), digests=(name,))
                for s, name in ((0, "cat"), (1, "dog")))
    cache = PrefixCache(GIB)
    reply = [e.token for e in run(model, Request("a", ids, GREEDY, images=cat), sample_limit=START,
                                  prefix_cache=cache)]  # no image-token ids in the reply
    follow = ids + reply + [5, 6, 7, 8]
    for images in (cat, dog):
        full = dataclasses.replace(images, **dict(zip(("positions", "rope_delta"), _positions(follow, grids))))
        events = list(run(model, Request("b", follow, GREEDY, images=full), sample_limit=START, prefix_cache=cache))
        assert events[0].cached == (len(ids) + len(reply) - 1 if images is cat else 0)  # another image: a miss
        assert [e.token for e in events] == list(generate_tokens(model, follow, GREEDY, sample_limit=START,
                                                                 images=full))


def _positions(ids, grids):
    from qwen35.models.vision import mrope_positions
    return mrope_positions(ids, grids, IMAGE, 2)
