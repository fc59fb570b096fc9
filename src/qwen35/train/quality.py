"""The chat quality bar: do greedy replies end with <|im_end|> in time, and are they English sentences?"""

from __future__ import annotations

import re

from qwen35.api import Qwen35
from qwen35.runtime import generate_tokens
from qwen35.sampling import SamplingParams
from qwen35.train.data import is_english

SENTENCE = re.compile(r"[A-Z][^.!?\n]{2,}[.!?]")


def is_english_sentences(text: str) -> bool:
    """At least one capitalised sentence with an end mark, and English by the stopword test."""
    return bool(SENTENCE.search(text)) and is_english(text)


def chat_quality(model: Qwen35, prompts: list[str], max_tokens: int = 256, samples: int = 5) -> dict:
    """Greedy reply per prompt (thinking off); rates of ending with <|im_end|>, of English, and of both."""
    im_end = model.tokenizer.token_to_id("<|im_end|>")
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    ended = english = both = 0
    shown = []
    for prompt in prompts:
        text = model.chat_prompt([{"role": "user", "content": prompt}], enable_thinking=False)
        tokens = list(generate_tokens(model.model, model.tokenizer.encode(text), params,
                                      model.tokenizer.eos_token_ids, model.tokenizer.vocab_size))
        stopped = tokens[-1] == im_end
        reply = model.tokenizer.decode(tokens[:-1] if stopped else tokens)
        ok = is_english_sentences(reply)
        ended, english, both = ended + stopped, english + ok, both + (stopped and ok)
        if len(shown) < samples:
            shown.append({"prompt": prompt, "reply": reply, "ended": stopped, "tokens": len(tokens)})
    n = max(len(prompts), 1)
    return {"prompts": len(prompts), "ended_with_im_end": round(ended / n, 3), "english_sentences": round(english / n, 3),
            "both": round(both / n, 3), "samples": shown}
