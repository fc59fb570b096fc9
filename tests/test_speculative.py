"""Speculative decoding with the MTP head: output token for token the plain decode's, greedy and seeded (dense,
MoE, int4, bf16, batches of padded sequences, every acceptance pattern), the sampled distribution unchanged
(chi-square), the head's drafts those of a whole-sequence reference, stop strings inside an accepted run, the
prefix cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scipy.stats import chisquare

from conftest import VOCAB, randomize_
from qwen35.cache import make_cache
from qwen35.loading import load_model
from qwen35.ops import cpu
from qwen35.models.qwen3_5 import MultiTokenPredictor, _attention_mask, rotary_cos_sin
from qwen35.quant import quantize
from qwen35.runtime import Engine, PrefixCache, Request, Scheduler, run
from qwen35.runtime.prefill import prefill
from qwen35.runtime.speculative import Speculator, make_speculator, pays_by_default
from qwen35.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def with_head(model, seed: int = 7):
    """The model with a random MTP head where its checkpoint has none."""
    if model.mtp is None:
        model.config = dataclasses.replace(model.config, mtp_num_hidden_layers=1)
        model.mtp = MultiTokenPredictor(model.config).to(model.embed_tokens.weight.dtype)
        randomize_(model.mtp, seed)
    return model


@pytest.fixture(scope="module", params=["dense-tied-fp32", "moe-untied-bf16", "dense-int4-bf16"])
def model(request, reference_checkpoint):
    name, dtype = request.param.rsplit("-", 1)
    m = load_model(reference_checkpoint(name.replace("-int4", "-tied"))[0],
                   dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
    m = with_head(m)
    return quantize(m, bits=4, group_size=32) if "int4" in name else m


class Oracle(Speculator):
    """Drafts what the plain run produced (`truth`, by sequence), every `wrong`-th draft corrupted: every
    acceptance pattern (all, some, none) occurs; the head still runs, so its state is exercised."""

    def __init__(self, model, k: int, truth: dict[str, list[int]], wrong: int = 5):
        super().__init__(model, k)
        self.truth, self.wrong, self.count, self.running = truth, wrong, 0, []

    def step(self, cache, running, sample):
        self.running = running
        return super().step(cache, running, sample)

    def propose(self, cache, x, base, k):
        self.drafted = super().propose(cache, x, base, k)  # the head's own drafts
        rows = []
        for seq in self.running:
            truth, n = self.truth[seq.id], len(seq.generated)
            row = []
            for i in range(k):
                self.count += 1
                token = truth[n + i] if n + i < len(truth) else 0
                row.append((token + 1) % VOCAB if self.count % self.wrong == 0 else token)
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long).view(len(rows), k)


def _prompts(lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _run(model, prompts, params=GREEDY, speculator=None, **engine) -> tuple[dict[str, list[int]], int]:
    eng = Engine(model, scheduler=Scheduler(max_running=4, prefill_chunk=16), speculator=speculator, **engine)
    for i, prompt in enumerate(prompts):
        eng.add(Request(str(i), prompt, params))
    out, steps = {str(i): [] for i in range(len(prompts))}, 0
    while eng.has_work():
        for event in eng.step():
            out[event.seq_id].append(event.token)
        steps += 1
    return out, steps


@pytest.mark.parametrize("lengths", [(23,), (5, 23, 40)], ids=["one", "batch-of-3-padded"])
def test_greedy_output_is_the_plain_output_token_for_token(model, lengths):
    prompts = _prompts(lengths)
    plain, plain_steps = _run(model, prompts)
    for k in (1, 2, 4):
        assert _run(model, prompts, speculator=Speculator(model, k))[0] == plain  # the random head's own drafts
        drafted, steps = _run(model, prompts, speculator=Oracle(model, k, plain))
        assert drafted == plain
        assert steps < plain_steps  # drafts were accepted: the rollback and catch-up paths ran


def test_a_batch_past_the_kernel_rows_drafts_less():
    spec = Speculator.__new__(Speculator)
    spec.k = 4
    assert [spec.tokens_for(b) for b in (1, 3, 4, 5, 8, 9)] == [4, 4, 3, 2, 1, 0]


def _reference_drafts(model, tokens: list[int]) -> torch.Tensor:
    """The head over a whole sequence at once, no cache, written from its definition: at position t it reads the
    final hidden state h_t and the embedding of token t+1, at t's position, causally; its argmax at t drafts
    token t+2."""
    ids = torch.tensor([tokens])
    hidden = model.features(ids)
    t = len(tokens) - 1
    positions = torch.arange(t)[None, None].expand(3, 1, t)
    mtp = model.mtp
    x = mtp.fc(torch.cat([mtp.pre_fc_norm_embedding(model.embed_tokens(ids[:, 1:])),
                          mtp.pre_fc_norm_hidden(hidden[:, :-1])], dim=-1))
    rope = rotary_cos_sin(model.config, positions, x.dtype)
    for layer in mtp.layers:
        x = layer(x, rope, _attention_mask(torch.ones(1, t, dtype=torch.bool), t), None, None)
    return model.lm_head(mtp.norm(x))[0].float().argmax(-1)


@torch.inference_mode()
@pytest.mark.parametrize("lengths", [(19,), (5, 19, 30)], ids=["one", "batch-of-3-padded"])
def test_drafts_are_those_of_the_whole_sequence_reference(model, lengths):
    """Every sequence's first draft at every step is the head's prediction over its whole sequence: its K/V
    (caught up after each verify pass, with holes where a batch-mate kept more) is exact."""
    prompts = _prompts(lengths)
    plain, _ = _run(model, prompts)
    seen: list[tuple[str, int, int]] = []  # (sequence, tokens generated when drafting, its first draft)

    class Recorder(Oracle):
        def propose(self, cache, x, base, k):
            oracle = super().propose(cache, x, base, k)
            seen.extend((s.id, len(s.generated), int(d)) for s, d in zip(self.running, self.drafted[:, 0]))
            return oracle

    assert _run(model, prompts, speculator=Recorder(model, 3, plain, wrong=3))[0] == plain
    # with n tokens generated, the state holds prompt + generated[:-1] and the head drafts the token after
    # generated[-1]: the reference's prediction at position len(prompt) + n - 2
    agree = total = 0
    for i, prompt in enumerate(prompts):
        mine = [(n, d) for sid, n, d in seen if sid == str(i)]
        reference = _reference_drafts(model, prompt + plain[str(i)])
        assert len(mine) > 3
        agree += sum(d == int(reference[len(prompt) + n - 2]) for n, d in mine)
        total += len(mine)
    exact = model.embed_tokens.weight.dtype == torch.float32  # bf16: the reference's full-sequence products
    assert agree == total if exact else agree >= 0.9 * total  # round otherwise; a near-tie argmax can flip


@pytest.mark.parametrize("lengths", [(23,), (5, 23, 40)], ids=["one", "batch-of-3-padded"])
def test_seeded_sampling_is_the_plain_output_token_for_token(model, lengths):
    """Sampled tokens are drawn as plain decoding draws them, in the same order: the same seed gives the same
    reply with or without drafts, whatever the batch and k."""
    prompts = _prompts(lengths)
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, ignore_eos=True, seed=5)
    plain, plain_steps = _run(model, prompts, params)
    for k in (1, 3):
        drafted, steps = _run(model, prompts, params, speculator=Oracle(model, k, plain))
        assert drafted == plain and steps < plain_steps


@torch.inference_mode()
def test_the_engine_samples_the_plain_distribution_with_drafts(reference_checkpoint):
    """(first, second) reply tokens over a 6-token vocabulary, 3,000 seeded replies, the second always drafted
    (token 2) and verified: the counts follow p(first) p(second | first), computed from the model's logits."""
    model = with_head(load_model(reference_checkpoint("dense-tied")[0], dtype=torch.float32))
    vocab, prompt, params = 6, _prompts((9,))[0], SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True)

    class Fixed(Speculator):
        def propose(self, cache, x, base, k):
            super().propose(cache, x, base, k)
            return torch.full((x.shape[0], k), 2, dtype=torch.long)

    pairs = torch.zeros(vocab, vocab)
    engine = Engine(model, sample_limit=vocab, scheduler=Scheduler(max_running=5, prefill_chunk=16),
                    speculator=Fixed(model, 2))
    for start in range(0, 3000, 5):
        for seed in range(start, start + 5):
            engine.add(Request(str(seed), prompt, dataclasses.replace(params, seed=seed)))
        tokens: dict[str, list[int]] = {}
        while engine.has_work():
            for event in engine.step():
                tokens.setdefault(event.seq_id, []).append(event.token)
        for first, second in tokens.values():
            pairs[first, second] += 1
    first = torch.softmax(model(torch.tensor([prompt]))[0, -1, :vocab].double(), -1)
    expected = torch.stack([first[a] * torch.softmax(model(torch.tensor([prompt + [a]]))[0, -1, :vocab].double(), -1)
                            for a in range(vocab)])
    assert chisquare(pairs.flatten(), expected.flatten() * pairs.sum()).pvalue > 1e-3


def test_restores_need_the_head_state_and_plain_engines_drop_it(model):
    prompt, spec = _prompts((40,))[0], Speculator(model, 2)

    def turns(cache: PrefixCache, speculator) -> list[list]:
        first = [e.token for e in run(model, Request("a", prompt, GREEDY), prefix_cache=cache, speculator=speculator)]
        events = list(run(model, Request("b", prompt + first + [5, 6, 7], GREEDY), prefix_cache=cache,
                          speculator=speculator))
        return [first, events[0].cached, [e.token for e in events]]

    plain_cache, spec_cache = PrefixCache(1 << 30), PrefixCache(1 << 30)
    expected = turns(plain_cache, None)
    assert expected[1] == len(prompt) + len(expected[0]) - 1  # the second turn resumed from the reply's state
    assert turns(spec_cache, spec) == expected  # snapshots with the head's state, restored by a drafting engine
    follow = prompt + expected[0] + [5, 6, 7]
    events = list(run(model, Request("c", follow, GREEDY), prefix_cache=spec_cache))  # a plain engine, same
    assert events[0].cached == expected[1] and [e.token for e in events] == expected[2]  # snapshots: head dropped
    cold = [e.token for e in run(model, Request("d", follow, GREEDY))]
    events = list(run(model, Request("e", follow, GREEDY), prefix_cache=plain_cache, speculator=spec))
    assert events[0].cached == 0 and [e.token for e in events] == cold  # no head state there: a miss


def test_a_point_captured_inside_a_forward_keeps_the_head_state(model):
    """A snapshot point inside a prefill forward is captured there, the MTP head's K/V and hidden state with it:
    a drafting engine resumes from it and writes what a cold engine writes."""
    prompt, spec, cache = _prompts((40,))[0], Speculator(model, 2), PrefixCache(1 << 30)
    list(run(model, Request("a", prompt, GREEDY, marks=(23,)), prefix_cache=cache, speculator=spec))
    other = prompt[:23] + [9, 8, 7, 6]
    position, got = cache.restore(other, (), draft=True)
    cold = make_cache(model.config, 1, draft_layers=model.config.mtp_num_hidden_layers)
    with torch.inference_mode():
        prefill(model, torch.tensor([prompt[:23]]), cold)
    assert position == 23 and got.length == cold.length and got.draft[0].length == cold.draft[0].length == 22
    for mine, theirs in [(got.hidden, cold.hidden), *[(a, b) for x, y in zip(got.layers + got.draft,
                         cold.layers + cold.draft) for a, b in zip(x.tensors(), y.tensors())]]:
        exact = mine.dtype == torch.float32 and got.hidden.dtype == torch.float32  # bf16: computed over other
        torch.testing.assert_close(mine, theirs, atol=1e-5 if exact else 0.05, rtol=0 if exact else 0.02)  # rows
    events = list(run(model, Request("b", other, GREEDY), prefix_cache=cache, speculator=spec))
    assert events[0].cached == 23
    assert [e.token for e in events] == [e.token for e in run(model, Request("c", other, GREEDY))]


def test_a_stop_string_inside_an_accepted_run_ends_the_reply_there(default_model):
    qwen, model = default_model, default_model.model
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    options = dict(temperature=0, max_tokens=40, ignore_eos=True)
    saved = qwen.speculator, model.mtp, model.config
    reply: list[int] = []

    class Capture(Speculator):  # the reply's token ids (greedy: the plain reply's)
        def step(self, cache, running, sample):
            events = super().step(cache, running, sample)
            reply[:] = running[0].generated
            return events

    class Perfect(Oracle):  # drafts the reply itself: every draft accepted, runs of k + 1 = 4 tokens
        def step(self, cache, running, sample):
            self.truth = {seq.id: reply for seq in running}
            return super().step(cache, running, sample)

    try:
        with_head(model)
        qwen.speculator = Capture(model, 1)
        text = qwen.chat(messages, **options).text
        decode = qwen.tokenizer.decode
        # token 0 comes from the prefill, then runs 1-4, 5-8, ...: a stop string on tokens i, i+1 of one run
        i = next(i for i in range(5, 30) if (i - 1) // 4 == i // 4 and decode(reply[i:i + 2]).strip()
                 and text.find(decode(reply[i:i + 2])) == len(decode(reply[:i])))
        stop = decode(reply[i:i + 2])
        qwen.speculator = None
        expected = qwen.chat(messages, stop=[stop], **options)
        qwen.speculator = Perfect(model, 3, {}, wrong=10 ** 9)
        got = qwen.chat(messages, stop=[stop], **options)
        assert got.text == expected.text == text[:text.index(stop)]
        assert got.finish_reason == expected.finish_reason == "stop"
    finally:
        qwen._background.settle()  # the last reply's warm-up runs with the speculator it started with
        qwen.speculator, model.mtp, model.config = saved


def test_bad_settings_are_refused_with_what_to_do(reference_checkpoint):
    bare = load_model(reference_checkpoint("dense-tied")[0], dtype=torch.float32)
    bare.mtp = None
    with pytest.raises(ValueError, match="no multi-token-prediction head"):
        Speculator(bare, 2)
    with pytest.raises(ValueError, match="draft 1 to 4"):
        Speculator(with_head(load_model(reference_checkpoint("dense-tied")[0])), 5)
    assert make_speculator(bare, "nowhere", None, None) is None  # the default: off without a head


def test_the_default_drafts_only_where_it_was_measured_to_pay(reference_checkpoint, monkeypatch):
    monkeypatch.setattr(cpu, "has_kernels", lambda: True)
    monkeypatch.setattr(cpu, "kernel_isa", lambda: "avx512")
    model = load_model(reference_checkpoint("dense-tied")[0], dtype=torch.bfloat16)
    assert model.mtp is not None and not pays_by_default(model)  # a width no official size has
    model.config = dataclasses.replace(model.config, hidden_size=1024)  # as the 0.8B's
    assert pays_by_default(model)
    monkeypatch.setattr(cpu, "has_kernels", lambda: False)
    assert not pays_by_default(model)  # PyTorch's kernels, bf16 emulated on AVX2: verify passes cost too much
    monkeypatch.setattr(cpu, "has_kernels", lambda: True)
    assert not pays_by_default(load_model(reference_checkpoint("dense-tied")[0], dtype=torch.float32))
    small, large = (dataclasses.replace(model.config, hidden_size=h) for h in (1024, 2560))  # the 0.8B's, the 4B's
    for bits, head in ((4, 8), (4, 0), (8, 8)):
        quantized = quantize(load_model(reference_checkpoint("dense-tied")[0], dtype=torch.bfloat16), bits=bits,
                             group_size=32, head=head)
        quantized.config = small
        assert not pays_by_default(quantized)  # int4 below the 4B, int8: did not pay
        quantized.config = large
        assert pays_by_default(quantized) == (bits == 4), (bits, head)  # int4 from the 4B, whatever its head
        monkeypatch.setattr(cpu, "kernel_isa", lambda: "avx2")
        assert not pays_by_default(quantized)  # but not on the AVX2 kernels: each int4 row costs arithmetic
        monkeypatch.setattr(cpu, "kernel_isa", lambda: "avx512")
    monkeypatch.setattr(cpu, "kernel_isa", lambda: "avx2")
    assert pays_by_default(model)  # bf16 pays on AVX2 as on AVX-512
