"""The training loop: AdamW, warmup + cosine, clipping, accumulation, periodic eval, checkpoint + resume.

It trains `Qwen35Model` itself (the chunked delta rule is differentiable), on one process or under `torchrun`
(DDP, or FSDP2 with `fsdp=True`; gloo on CPU, NCCL on GPU). Batches come from `batch_fn(step, micro, rank,
world)`, a pure function of its arguments, so a resumed run sees exactly the batches it would have seen.
Checkpoints are safetensors + JSON (no pickle): the model in the official layout, the optimizer state beside it.
A model with a multi-token-prediction head (`model.mtp`) trains it alongside: the loss adds `mtp_weight` times the
head's cross-entropy on the token after next (`mtp_loss`, logged separately). Frozen parameters
(`requires_grad=False`) are left out of the optimizer, so they stay bit-identical.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from qwen35.loading import load_model, save_state_dict
from qwen35.models import Qwen35Model
from qwen35.models.qwen3_5 import rotary_cos_sin

Batch = tuple[torch.Tensor, torch.Tensor]  # (input ids (B, T), targets (B, T) with -100 = no loss)
BatchFn = Callable[[int, int, int, int], Batch]
# (model, batch) -> (the loss to minimise, target tokens in the batch, {metric: mean over the batch}) ; the metrics
# are logged per step (averaged over micro-batches) and, token-weighted, on the validation batches as val_<metric>
Objective = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, int, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    time_budget_s: float | None = None  # stop (and save) once this much wall time has passed
    stop_at_step: int | None = None  # end this run early at this step (saved); a later run resumes the schedule
    fsdp: bool = False
    mtp_weight: float = 0.3  # λ: loss = CE(next token) + λ·CE(MTP head, token after next), when the model has a head

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def init_weights(model: Qwen35Model, seed: int, std: float = 0.02) -> None:
    """The reference's initialisation: N(0, std) matrices, zero-centred norms at 0, A = U(0.01, 16)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.01, 16, generator=g).log())
            elif name.endswith(("dt_bias", "linear_attn.norm.weight")):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return (dist.get_rank() if world > 1 else 0), world, device


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def mtp_hidden(model: Qwen35Model, hidden: torch.Tensor, next_ids: torch.Tensor,
               positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The MTP head without a cache: at each position t, (embedding of next_ids[t], hidden[t]) -> its hidden state
    (B, T, H), whose `lm_head` logits predict the token after next_ids[t]. Rope positions default to 0..T-1 (the
    body's own at t); attn_mask (B or 1, 1, T, T) bool defaults to causal."""
    b, t = next_ids.shape
    if positions is None:
        positions = torch.arange(t, device=next_ids.device)[None].expand(b, t)
    rope = rotary_cos_sin(model.config, positions[None].expand(3, b, t), hidden.dtype)
    return model.mtp(model.embed_tokens(next_ids), hidden, rope, attn_mask, None)


def forward_with_hidden(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, final hidden states) from one forward through `model` itself (so a DDP / FSDP wrapper runs its
    hooks); the hidden states are the output of the inner model's final `norm`, captured on the way."""
    inner = getattr(model, "module", model)
    captured: list[torch.Tensor] = []
    handle = inner.norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, captured[-1]


def standard_objective(mtp_weight: float) -> Objective:
    """Next-token cross-entropy (`loss`); with an MTP head also its cross-entropy on the token after next
    (`mtp_loss`: position t reads token t+1 and h_t and predicts token t+2, where the batch has a target for it,
    so SFT batches score the head on replies only), added with weight `mtp_weight`."""
    def objective(model: torch.nn.Module, batch: Batch):
        x, y = batch
        inner = getattr(model, "module", model)
        n = int((y != -100).sum())
        if getattr(inner, "mtp", None) is None or x.shape[1] < 2:
            loss = _ce(model(x), y)
            return loss, n, {"loss": loss}
        logits, hidden = forward_with_hidden(model, x)
        loss = _ce(logits, y)
        mtp = _ce(inner.lm_head(mtp_hidden(inner, hidden[:, :-1], x[:, 1:])), y[:, 1:])
        return loss + mtp_weight * mtp, n, {"loss": loss, "mtp_loss": mtp}
    return objective


def loss_fn(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over target positions, and how many there were."""
    x, y = batch
    return _ce(model(x), y), int((y != -100).sum())


@torch.no_grad()
def evaluate_metrics(model: torch.nn.Module, batches: list[Batch], device: torch.device,
                     objective: Objective) -> dict[str, float]:
    """The objective's metrics over `batches`, each a token-weighted mean."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    count = 0
    for x, y in batches:
        _, n, metrics = objective(model, (x.to(device), y.to(device)))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) * n
        count += n
    model.train(was_training)
    return {k: v / max(count, 1) for k, v in totals.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[Batch], device: torch.device) -> float:
    """Mean next-token cross-entropy over the target tokens of `batches`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        loss, n = loss_fn(model, (x.to(device), y.to(device)))
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / max(count, 1)


def _save_state(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, config, step: int,
                cfg: TrainConfig, history: list[dict], rank: int) -> None:
    """Model in the official layout + optimizer tensors in safetensors + step/config/history in JSON.

    Called on every rank: under FSDP the full state is gathered collectively; rank 0 writes it.
    """
    model_sd, opt_sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    tmp = out.with_name(out.name + ".tmp")
    save_state_dict(config, model_sd, tmp, torch.float32)
    tensors = {f"{name}::{k}": v.contiguous() for name, s in opt_sd["state"].items() for k, v in s.items()}
    (tmp / "trainer").mkdir()  # beside, not among, the model files: loaders glob *.safetensors
    save_file(tensors, str(tmp / "trainer" / "optimizer.safetensors"))
    meta = {"step": step, "config": asdict(cfg), "param_groups": opt_sd["param_groups"], "history": history}
    (tmp / "trainer" / "state.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _load_state(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    meta = json.loads((out / "trainer" / "state.json").read_text())
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(out / "trainer" / "optimizer.safetensors")).items():
        name, field = key.split("::", 1)
        state.setdefault(name, {})[field] = value
    weights = load_model(out, dtype=torch.float32).state_dict()
    set_state_dict(model, opt, model_state_dict=weights,
                   optim_state_dict={"state": state, "param_groups": meta["param_groups"]},
                   options=StateDictOptions(full_state_dict=True))
    return meta["step"], meta["history"]


def train(model: Qwen35Model, batch_fn: BatchFn, val_batches: list[Batch], cfg: TrainConfig, out_dir: Path,
          resume: bool = True, log: Callable[[str], None] = print, objective: Objective | None = None) -> list[dict]:
    """Train in place; returns the history of logged metrics. Checkpoints go to out_dir/checkpoint.

    `objective` defaults to `standard_objective(cfg.mtp_weight)`; only parameters with requires_grad are trained."""
    objective = objective or standard_objective(cfg.mtp_weight)
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    ckpt = Path(out_dir) / "checkpoint"
    start, history = 0, []
    model.to(device).train()
    wrapped: torch.nn.Module = model
    if world > 1 and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    elif world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    if resume and (ckpt / "trainer" / "state.json").exists():
        start, history = _load_state(ckpt, wrapped, opt)
        log(f"resumed from {ckpt} at step {start}")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    from qwen35.train.progress import TrainProgress

    progress = TrainProgress(cfg.steps, start, enabled=rank == 0)
    t0, tokens, window_tokens, window_t = time.time(), 0, 0, time.time()
    step = start
    with progress:
        for step in range(start, cfg.steps):
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            loss_sum, sums = 0.0, {}
            for micro in range(cfg.grad_accum):
                x, y = (t.to(device) for t in batch_fn(step, micro, rank, world))
                sync = (contextlib.nullcontext() if micro == cfg.grad_accum - 1 or not hasattr(wrapped, "no_sync")
                        else wrapped.no_sync())
                with sync, autocast:
                    loss, n, metrics = objective(wrapped, (x, y))
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
                window_tokens += n * world
            norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                rate = window_tokens / max(time.time() - window_t, 1e-9)
                tokens += window_tokens
                window_tokens, window_t = 0, time.time()
                record = {"step": done, "loss": round(sums.pop("loss", loss_sum), 4),
                          **{k: round(v, 4) for k, v in sums.items()}, "lr": cfg.lr_at(step),
                          "grad_norm": float(norm), "tokens": tokens, "tok_per_s": round(rate, 1),
                          "elapsed_s": round(time.time() - t0, 1)}
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    for k, v in evaluate_metrics(wrapped, val_batches, device, objective).items():
                        record[f"val_{k}"] = round(v, 4)
                history.append(record)
                progress.update(done, record)
                if rank == 0:
                    log(json.dumps(record))
            out_of_time = cfg.time_budget_s is not None and time.time() - t0 > cfg.time_budget_s
            if world > 1:  # every rank must agree, or the next collective deadlocks
                flag = torch.tensor(float(out_of_time), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                out_of_time = bool(flag.item())
            out_of_time = out_of_time or done == cfg.stop_at_step
            if done % cfg.save_every == 0 or done == cfg.steps or out_of_time:
                _save_state(ckpt, wrapped, opt, model.config, done, cfg, history, rank)
            if out_of_time:
                log(f"stopping at step {done} of {cfg.steps} (time budget or stop_at_step); resume continues")
                break
    if world > 1:
        dist.barrier()
    return history
