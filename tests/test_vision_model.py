"""The vision tower, M-RoPE positions and image+text decoding against transformers 5.23 on tiny random configs (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_CONFIGS, randomize_
from qwen35.cache import make_cache, merge_caches, select_rows
from qwen35.config import ConfigError
from qwen35.runtime import generate_tokens
from qwen35.runtime.prefill import prefill
from qwen35.loading import CheckpointError, load_model, load_vision
from qwen35.models.vision import ImageInputs, VisionConfig, mrope_positions
from qwen35.sampling import SamplingParams

tf = pytest.importorskip("transformers")
TOL = 1e-4
VOCAB, IMAGE, START, END = 300, 290, 288, 289
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64)


def make_vl_reference(text_name: str = "dense-tied", seed: int = 0, vocab: int = VOCAB, image: int = IMAGE,
                      start: int = START, end: int = END):
    """A random Qwen3_5ForConditionalGeneration whose image tokens lie inside the tiny vocabulary."""
    text = dict(TINY_CONFIGS[text_name], vocab_size=vocab)
    config = tf.Qwen3_5Config(text_config=text, vision_config=dict(VISION, out_hidden_size=text["hidden_size"]),
                              tie_word_embeddings=text["tie_word_embeddings"], image_token_id=image,
                              video_token_id=image + 1, vision_start_token_id=start, vision_end_token_id=end)
    torch.manual_seed(seed)
    model = tf.Qwen3_5ForConditionalGeneration(config).eval()
    randomize_(model, seed)
    with torch.no_grad():  # LayerNorm gains near 1 so image features carry signal through the tower
        for name, p in model.model.visual.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    if text["tie_word_embeddings"]:
        model.tie_weights()
    return model


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """(reference, our text model, our vision tower) from one saved checkpoint."""
    ref = make_vl_reference()
    path = tmp_path_factory.mktemp("vl")
    ref.save_pretrained(path)
    return ref, load_model(path, dtype=torch.float32), load_vision(path, dtype=torch.float32), path


def pixels(grids, seed=0):
    return torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(seed))


def prompt_with(grids, text=(5, 6, 7)):
    """text, then per image: vision_start, its image tokens, vision_end, text."""
    ids = list(text)
    for k, (t, h, w) in enumerate(grids):
        ids += [START] + [IMAGE] * (t * h * w // 4) + [END] + [10 + k, 11 + k]
    return ids


def reference_inputs(ids, grids, seed=0):
    return dict(input_ids=torch.tensor([ids]), pixel_values=pixels(grids, seed), image_grid_thw=torch.tensor(grids),
                mm_token_type_ids=torch.tensor([[int(i == IMAGE) for i in ids]]))


def encode(vision, ids, grids, seed=0) -> ImageInputs:
    positions, delta = mrope_positions(ids, grids, IMAGE, 2)
    with torch.no_grad():
        return ImageInputs(vision(pixels(grids, seed), grids), positions, delta)


@pytest.mark.parametrize("grids", [[(1, 2, 2)], [(1, 8, 8)], [(1, 4, 6)], [(1, 12, 10), (1, 2, 4)], [(1, 30, 2)]])
def test_vision_tower_matches_reference(vl, grids):
    ref, _, vision, _ = vl
    x = pixels(grids)
    with torch.no_grad():
        expected = ref.model.visual(x, grid_thw=torch.tensor(grids)).pooler_output
        got = vision(x, grids)
    assert got.shape == expected.shape == (sum(h * w // 4 for _, h, w in grids), 64)
    err = (got - expected).abs().max().item()
    print(f"vision tower {grids}: max |d| = {err:.2e} (scale {expected.abs().max().item():.2f})")
    assert err <= TOL


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 6, 2), (1, 2, 2)], [(1, 10, 4)]])
def test_rope_positions_match_reference(vl, grids):
    ref = vl[0]
    for ids in (prompt_with(grids), prompt_with(grids, text=())[1:-2]):  # also: the image first and last
        inputs = reference_inputs(ids, grids)
        expected, delta = ref.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                   inputs["image_grid_thw"])
        got, got_delta = mrope_positions(ids, grids, IMAGE, 2)
        assert torch.equal(got, expected[:, 0]) and got_delta == int(delta)


def test_documented_rope_example():
    """qwen35-architecture.md section 5: 4 text, image grid (1,4,6), 3 text."""
    ids = [1, 2, 3, 4] + [IMAGE] * 6 + [5, 6, 7]
    pos, delta = mrope_positions(ids, [(1, 4, 6)], IMAGE, 2)
    assert pos.tolist() == [[0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9], [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9],
                            [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9]]
    assert delta == 10 - 13
    with pytest.raises(ValueError, match="image tokens"):
        mrope_positions(ids[:-4], [(1, 4, 4)], IMAGE, 2)


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 12, 10), (1, 2, 4)]])
def test_image_text_logits_match_reference(vl, grids):
    ref, model, vision, _ = vl
    ids = prompt_with(grids)
    images = encode(vision, ids, grids)
    with torch.no_grad():
        expected = ref(**reference_inputs(ids, grids)).logits
        got = model(torch.tensor([ids]), position_ids=images.positions[:, None],
                    inputs_embeds=model.embed(torch.tensor([ids]), images.features))
    err = (got - expected).abs().max().item()
    print(f"image+text logits {grids}: max |dlogit| = {err:.2e} (scale {expected.abs().max().item():.1f})")
    assert err <= TOL


def test_chunked_prefill_then_decode_continues_positions(vl):
    """Chunks that cut through an image, then cached decoding (rope_delta), vs. the reference's full forward."""
    ref, model, vision, _ = vl
    grids = [(1, 6, 4), (1, 2, 2)]
    prompt = prompt_with(grids)
    follow = [20, 21, 22, 23]
    images = encode(vision, prompt, grids)
    cache = make_cache(model.config)
    with torch.no_grad():
        first = prefill(model, torch.tensor([prompt]), cache, chunk=5, images=images)
        steps = [model(torch.tensor([[t]]), cache)[0, -1] for t in follow]
        expected = ref(**reference_inputs(prompt + follow, grids)).logits[0]
    got = torch.stack([first[0], *steps[:-1]])
    err = (got - expected[len(prompt) - 1:-1]).abs().max().item()
    assert int(cache.rope_delta[0]) == images.rope_delta < 0
    assert err <= TOL


def test_greedy_tokens_match_reference_generate(vl):
    ref, model, vision, _ = vl
    grids = [(1, 4, 6)]
    ids = prompt_with(grids)
    with torch.no_grad():
        out = ref.generate(**reference_inputs(ids, grids), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    expected = out[0, len(ids):].tolist()
    got = list(generate_tokens(model, ids, SamplingParams(temperature=0, max_tokens=32), images=encode(vision, ids, grids)))
    assert len(expected) == 32 and got == expected


def test_batched_rows_keep_their_own_rope_delta(vl):
    """An image prompt and a text prompt decode together (left-padded batch) exactly as each does alone."""
    _, model, vision, _ = vl
    grids = [(1, 4, 6)]
    image_ids, text_ids = prompt_with(grids), [3, 4, 5, 6, 7, 8, 9]
    images = encode(vision, image_ids, grids)
    caches, alone = [], []
    with torch.no_grad():
        for ids, img in ((image_ids, images), (text_ids, None)):
            for target in (caches, alone):
                cache = make_cache(model.config)
                prefill(model, torch.tensor([ids]), cache, images=img)
                target.append(cache)
        batch = merge_caches(caches)
        assert batch.rope_delta.tolist() == [images.rope_delta, 0]
        tokens = torch.tensor([[40], [41]])
        for _ in range(3):
            both = model(tokens, batch)[:, -1]
            single = torch.cat([model(tokens[i:i + 1], alone[i])[:, -1] for i in range(2)])
            assert (both - single).abs().max().item() <= TOL
        kept = select_rows(batch, [0])
        assert kept.rope_delta.tolist() == [images.rope_delta]
        assert (model(tokens[:1], kept)[:, -1] - model(tokens[:1], alone[0])[:, -1]).abs().max().item() <= TOL


def test_engine_batches_image_and_text_prompts(vl):
    """Continuous batching: an image prompt (prefilled in chunks that cut through the image) beside text prompts
    gives the same greedy tokens as each prompt alone."""
    from qwen35.runtime import Engine, Request, Scheduler

    _, model, vision, _ = vl
    grids = [(1, 6, 4)]
    image_ids = prompt_with(grids)
    images = encode(vision, image_ids, grids)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = {"img": (image_ids, images), "a": ([3, 4, 5, 6], None), "b": ([9, 8, 7, 6, 5, 4, 3, 2, 1], None)}
    alone = {k: list(generate_tokens(model, ids, params, images=img)) for k, (ids, img) in prompts.items()}
    engine = Engine(model, scheduler=Scheduler(prefill_chunk=5))
    for k in ("a", "img", "b"):
        engine.add(Request(k, prompts[k][0], params, images=prompts[k][1]))
    got: dict[str, list[int]] = {k: [] for k in prompts}
    while engine.has_work():
        for event in engine.step():
            got[event.seq_id].append(event.token)
    assert got == alone


def test_missing_or_foreign_vision_tensor_is_named(vl, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, _, path = vl
    state = load_file(str(path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    del state["model.visual.blocks.1.attn.qkv.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.visual\.blocks\.1\.attn\.qkv\.bias"):
        load_vision(tmp_path, dtype=torch.float32)
    state["model.visual.blocks.1.attn.qkv.bias"] = torch.zeros(5)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape \(5,\)"):
        load_vision(tmp_path, dtype=torch.float32)
    save_file({k: v for k, v in state.items() if not k.startswith("model.visual.")}, str(tmp_path / "model.safetensors"))
    assert load_vision(tmp_path) is None  # a checkpoint without a tower simply has no vision


def test_vision_config_errors_name_the_field(vl):
    raw = json.loads((vl[3] / "config.json").read_text())["vision_config"]
    assert VisionConfig.from_dict(raw, 64).head_dim == 16
    for change, field in (({"num_heads": 3}, "num_heads"), ({"num_position_embeddings": 60}, "num_position_embeddings"),
                          ({"deepstack_visual_indexes": [1]}, "deepstack"), ({"hidden_act": "relu6"}, "hidden_act")):
        with pytest.raises(ConfigError, match=field):
            VisionConfig.from_dict({**raw, **change}, 64)
    with pytest.raises(ConfigError, match="out_hidden_size"):
        VisionConfig.from_dict(raw, 128)


def test_quantized_checkpoint_keeps_the_vision_tower(vl, tmp_path):
    from qwen35.quant import QuantConfig, quantize_checkpoint

    _, _, vision, path = vl
    dst = quantize_checkpoint(path, tmp_path / "q", QuantConfig(bits=8), dtype=torch.float32)
    loaded = load_vision(dst, dtype=torch.float32)
    assert loaded is not None
    grids = [(1, 4, 6)]
    with torch.no_grad():
        assert torch.equal(loaded(pixels(grids), grids), vision(pixels(grids), grids))
