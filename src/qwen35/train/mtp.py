"""The multi-token-prediction head on its own: train `mtp.*` on a frozen model, measure how often its drafts match.

`qwen35 train mtp --model DIR --out DIR --minutes M` loads a checkpoint, gives it a new head (replacing any it
has), freezes every body parameter, trains only the head for M minutes and writes the checkpoint with the head:
the body's tensors are copied from the source file byte for byte, the `mtp.*` tensors are added under their
official names. The head learns the model's own distribution of the token after next (self-distillation: soft
cross-entropy to the body's next-token distribution one position later), since a speculative draft is accepted
exactly when it equals the model's own greedy token. It reads what it will be asked to continue: the model's own
greedy replies to the prompts of the nano recipe's chat train split (`data="greedy"`), not the ShareGPT replies
to them (`data="chats"`), whose wording the model would not have chosen.

Draft accuracy (`draft_accuracy`) is teacher-forced: at position t the head reads token t+1 and h_t, and its
argmax is compared with the model's greedy token after t+1; depth 2 chains, as speculative decoding does, from the
head's own output hidden state and its own drafted token (at position t+1, seeing the head's keys up to t). On the
model's own greedy replies this is exactly the acceptance rate of 1- and 2-token drafts.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qwen35.files import weight_files
from qwen35.loading import load_model
from qwen35.models import Qwen35Model
from qwen35.tokenizer import Tokenizer
from qwen35.train import data
from qwen35.train.card import update_card
from qwen35.train.trainer import Batch, TrainConfig, mtp_hidden, train


@dataclass(frozen=True)
class HeadRecipe:
    minutes: float = 20.0  # training time of the head (data, step-time probe and evaluation come on top)
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20
    seed: int = 0  # the nano recipe's seed: the same chat train / held-out split
    target: str = "self"  # "self": the body's own next-token distribution one position later; "data": the text
    data: str = "greedy"  # "greedy": the model's own greedy replies to the train prompts; "chats": ShareGPT's replies
    warm_start: bool = True  # the head's decoder layer starts as a copy of the body's last full-attention layer
    heldout_prompts: int = 50  # greedy replies to these held-out prompts measure the acceptance rate
    max_tokens: int = 256


def with_head(model: Qwen35Model, seed: int = 0, warm_start: bool = True) -> Qwen35Model:
    """A copy of `model` with a new MTP head (same body tensors; a head it has is left out).

    The head's matrices are N(0, 0.02), its zero-centred norms 0; with `warm_start` its decoder layer and final
    norm start as copies of the body's last full-attention layer and final norm."""
    config = replace(model.config, mtp_num_hidden_layers=1)
    fresh = Qwen35Model(config).to(model.norm.weight.device)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    missing, unexpected = fresh.load_state_dict(body, strict=False)
    if unexpected or any(not k.startswith("mtp.") for k in missing):
        raise ValueError(f"body tensors do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        fresh.lm_head.weight = fresh.embed_tokens.weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fresh.mtp.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.ndim >= 2 else torch.zeros(p.shape))
        if warm_start:
            last_full = max(i for i, t in enumerate(config.layer_types) if t == "full_attention")
            fresh.mtp.layers[0].load_state_dict(fresh.layers[last_full].state_dict())
            fresh.mtp.norm.load_state_dict(fresh.norm.state_dict())
    return fresh.to(model.norm.weight.dtype)


def freeze_body(model: Qwen35Model) -> list[str]:
    """requires_grad False on everything but `mtp.*`; returns the names left trainable."""
    model.requires_grad_(False)
    model.mtp.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def head_objective(target: str = "self"):
    """The head-only loss on a frozen body (no gradient through it), at positions t whose token t+2 has a target.

    `target` "self": soft cross-entropy to the body's own next-token distribution at t+1 (logged as `mtp_loss`,
    with `mtp_kl` = that minus the teacher's entropy); "data": cross-entropy to token t+2. Both log `mtp_ce` (to
    the text) and `mtp_agree` (the draft equals the body's greedy token: depth-1 acceptance, teacher-forced)."""
    if target not in ("self", "data"):
        raise ValueError(f"target must be 'self' or 'data', not {target!r}")

    def objective(model: torch.nn.Module, batch: Batch):
        x, y = batch
        model = getattr(model, "module", model)
        with torch.no_grad():
            hidden = model.features(x)
        keep = y[:, 1:] != -100  # position t: token t+2 is a target
        states = mtp_hidden(model, hidden[:, :-1], x[:, 1:])[keep]
        logits = model.lm_head(states).float()
        with torch.no_grad():
            teacher = model.lm_head(hidden[:, 1:][keep]).float()
        logp = F.log_softmax(logits, dim=-1)
        ce = F.nll_loss(logp, y[:, 1:][keep])
        agree = (logits.argmax(-1) == teacher.argmax(-1)).float().mean()
        metrics = {"mtp_ce": ce.detach(), "mtp_agree": agree}
        if target == "self":
            p = F.softmax(teacher, dim=-1)
            loss = -(p * logp).sum(-1).mean()
            entropy = -(p * F.log_softmax(teacher, dim=-1)).sum(-1).mean()
            metrics = {"mtp_loss": loss.detach(), "mtp_kl": (loss - entropy).detach(), **metrics}
        else:
            loss = ce
            metrics = {"mtp_loss": ce.detach(), **metrics}
        return loss, int(keep.sum()), metrics
    return objective


def chained_drafts(model: Qwen35Model, x: torch.Tensor, depth: int = 2) -> list[torch.Tensor]:
    """[body hidden (B, T, H), head states of draft 1 (B, T-1, H), of draft 2 (B, T-1, H)] for ids x (B, T), no
    cache: draft 1 at position i reads (x[i+1], h_i) at rope position i; draft 2 from i chains once more, reading
    (its draft-1 token, its draft-1 state) at position i+1 and seeing the head's draft-1 keys 0..i and itself, as
    a cached `Qwen35Model.draft` call after the first pass would. Both passes of draft 2 run in one call (2n
    queries under a block mask)."""
    b, t = x.shape
    n = t - 1
    hidden = model.features(x)
    first = mtp_hidden(model, hidden[:, :-1], x[:, 1:])
    out = [hidden, first]
    if depth >= 2:
        d1 = model.lm_head(first).argmax(-1)
        ids = torch.cat([x[:, 1:], d1], dim=1)
        states = torch.cat([hidden[:, :-1], first], dim=1)
        pos = torch.arange(n, device=x.device)
        positions = torch.cat([pos, pos + 1])[None].expand(b, 2 * n)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        mask = torch.cat([torch.cat([causal, torch.zeros_like(causal)], 1),
                          torch.cat([causal, torch.eye(n, dtype=torch.bool, device=x.device)], 1)], 0)
        out.append(mtp_hidden(model, states, ids, positions, mask[None, None])[:, n:])
    return out


@torch.no_grad()
def draft_accuracy(model: Qwen35Model, batches: list[Batch], depth: int = 2) -> dict:
    """Teacher-forced draft accuracy over the positions with targets: `depth_k` is the fraction of positions t
    where the k-th chained draft from t equals the model's greedy token after t+k (compared with its prediction at
    t+k given the batch's tokens), `chain_k` where drafts 1..k all do (what a k-token draft gets accepted in full);
    `positions_k` how many were scored. Exact acceptance rates when the batches are the model's own greedy text."""
    if model.mtp is None:
        raise ValueError("the model has no MTP head")
    if depth not in (1, 2):
        raise ValueError("depth must be 1 or 2")
    was_training = model.training
    model.eval()
    hits, chain, counts = [0] * depth, [0] * depth, [0] * depth
    for x, y in batches:
        if x.shape[1] < depth + 1:
            continue
        hidden, first, *second = chained_drafts(model, x, depth)
        greedy = model.lm_head(hidden).argmax(-1)  # greedy[:, i]: the model's token after i
        ok1 = model.lm_head(first).argmax(-1) == greedy[:, 1:]  # from i: the token after i+1
        mask1 = y[:, 1:] != -100
        hits[0] += int((ok1 & mask1).sum())
        chain[0] += int((ok1 & mask1).sum())
        counts[0] += int(mask1.sum())
        if depth == 2:
            ok2 = model.lm_head(second[0][:, :-1]).argmax(-1) == greedy[:, 2:]  # from i: the token after i+2
            mask2 = y[:, 2:] != -100
            hits[1] += int((ok2 & mask2).sum())
            chain[1] += int((ok2 & ok1[:, :-1] & mask2).sum())
            counts[1] += int(mask2.sum())
    model.train(was_training)
    out = {}
    for k in range(depth):
        out[f"depth_{k + 1}"] = round(hits[k] / max(counts[k], 1), 4)
        out[f"chain_{k + 1}"] = round(chain[k] / max(counts[k], 1), 4)
        out[f"positions_{k + 1}"] = counts[k]
    return out


def greedy_replies(model: Qwen35Model, tokenizer: Tokenizer, prompts: list[str], max_tokens: int,
                   log=None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids) per prompt: the model's own greedy reply (thinking off, at most `max_tokens`, its
    end token included), 16 at a time in the engine's batch (a row's greedy text is the same as alone)."""
    from qwen35.runtime import Engine, Request, Scheduler
    from qwen35.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    engine = Engine(model, tokenizer.eos_token_ids, tokenizer.vocab_size,
                    Scheduler(max_running=16, max_waiting=len(prompts) + 1), isolate_failures=False)
    ids = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                          add_generation_prompt=True, enable_thinking=False))
           for p in prompts]
    for i, prompt in enumerate(ids):
        engine.add(Request(str(i), prompt, params))
    replies: list[list[int]] = [[] for _ in ids]
    done = 0
    while engine.has_work():
        for event in engine.step():
            replies[int(event.seq_id)].append(event.token)
            done += event.finish_reason is not None
            if log is not None and event.finish_reason is not None and done % 500 == 0:
                log(f"  {done:,} of {len(ids):,} replies")
    return list(zip(ids, replies))


def greedy_batches(model: Qwen35Model, tokenizer: Tokenizer, prompts: list[str], max_tokens: int) -> list[Batch]:
    """The model's own greedy replies (thinking off) to `prompts`, one (ids, targets) batch each, targets on the
    reply only: teacher-forced draft accuracy on these is the speculative-decoding acceptance rate."""
    out = []
    for ids, reply in greedy_replies(model, tokenizer, prompts, max_tokens):
        seq = torch.tensor(ids + reply)[None]
        targets = seq[:, 1:].clone()
        targets[:, : len(ids) - 1] = -100
        out.append((seq[:, :-1], targets))
    return out


def save_with_head(source: Path, model: Qwen35Model, out: Path) -> dict:
    """`out` = `source` plus the head: every file copied, model.safetensors rewritten with the source's tensors
    byte for byte (same dtypes and metadata) and the `mtp.*` tensors added in the embedding's dtype, config.json
    with mtp_num_hidden_layers 1. Checks that every non-head tensor is equal to the source's; returns counts."""
    source, out = Path(source), Path(out)
    files = weight_files(source)
    if len(files) != 1:
        raise ValueError(f"{source}: one model.safetensors expected, found {[f.name for f in files]}")
    with safe_open(str(files[0]), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(files[0]))
    original = {k: v for k, v in tensors.items() if not k.startswith("mtp.")}
    dtype = next(v.dtype for k, v in original.items() if k.endswith("embed_tokens.weight"))
    head = {f"mtp.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in model.mtp.state_dict().items()}
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config", config)
    text["mtp_num_hidden_layers"] = model.config.mtp_num_hidden_layers
    text["mtp_use_dedicated_embeddings"] = False
    if out.resolve() != source.resolve():
        out.mkdir(parents=True, exist_ok=True)
        for p in source.iterdir():
            if p.is_file() and p.suffix != ".safetensors" and p.name != "model.safetensors.index.json":
                shutil.copyfile(p, out / p.name)
    tmp = out / "model.safetensors.tmp"
    save_file({**original, **head}, str(tmp), metadata=metadata)
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    written = load_file(str(out / "model.safetensors"))
    for k, v in original.items():
        if written[k].dtype != v.dtype or not torch.equal(written[k], v):
            raise RuntimeError(f"{out}: body tensor {k} changed while adding the head")
    return {"body_tensors": len(original), "head_tensors": len(head),
            "head_parameters": sum(v.numel() for v in head.values())}


def chat_data(tokenizer: Tokenizer, seed: int, heldout_prompts: int):
    """The nano recipe's chat split (same filters, seed and fractions): train pairs, train examples, held-out
    chats (the SFT validation pairs) and held-out prompts (the quality bar's)."""
    stats = data.DataStats()
    pairs = data.sharegpt_pairs(stats, prompt_chars=(10, 1000), reply_chars=(20, 1000))
    pairs_train, pairs_rest = data.split(pairs, 0.04, seed)
    heldout = [p for p, _ in pairs_rest[:heldout_prompts]]
    examples = data.sft_examples(pairs_train, tokenizer, 512, stats, seed=seed)
    val_examples = data.sft_examples(pairs_rest[heldout_prompts:], tokenizer, 512, seed=seed)
    return pairs_train, examples, val_examples, heldout, stats


def greedy_examples(model: Qwen35Model, tokenizer: Tokenizer, prompts: list[str], max_tokens: int,
                    log=print) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) per prompt: the prompt (mask 0), then the model's greedy reply (mask 1), at most 512
    tokens in all."""
    pairs = greedy_replies(model, tokenizer, prompts, max_tokens, log)
    return [(ids + reply, [0] * len(ids) + [1] * len(reply)) for ids, reply in pairs if len(ids) + len(reply) <= 512]


def train_head(model_dir: Path, out: Path, work: Path, recipe: HeadRecipe = HeadRecipe(), log=print,
               command: str = "qwen35 train mtp") -> dict:
    """Train (only) the MTP head of the checkpoint in `model_dir` for `recipe.minutes`; write `out` (may be
    `model_dir`) with the head, its figures in training_figures.json ("mtp") and MODEL_CARD.md's section."""
    started = time.time()
    model_dir, out, work = Path(model_dir), Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    tokenizer = Tokenizer.from_dir(model_dir)
    body = load_model(model_dir, dtype=torch.float32)

    if recipe.data not in ("greedy", "chats"):
        raise ValueError(f"data must be 'greedy' or 'chats', not {recipe.data!r}")
    log("reading chat data …")
    pairs, examples, val_examples, heldout, stats = chat_data(tokenizer, recipe.seed, recipe.heldout_prompts)
    val = list(data.batches_sft(val_examples, 16, recipe.seed))
    log(f"{len(examples):,} train chats, {len(val_examples)} held-out chats, {len(heldout)} held-out prompts")
    shipped = load_model(model_dir).eval()  # greedy text as users get it: the checkpoint's dtype, fast kernels
    log("greedy replies to the held-out prompts (what the drafts are scored against) …")
    t = time.time()
    greedy = greedy_batches(shipped, tokenizer, heldout, recipe.max_tokens)
    log(f"  {sum(int((y != -100).sum()) for _, y in greedy):,} reply tokens in {time.time() - t:.0f}s")
    if recipe.data == "greedy":
        log(f"the model's greedy replies to the {len(pairs):,} train prompts (what the head learns to continue) …")
        t = time.time()
        examples = greedy_examples(shipped, tokenizer, [p for p, _ in pairs], recipe.max_tokens, log)
        log(f"  {sum(sum(m) for _, m in examples):,} reply tokens in {time.time() - t:.0f}s")
    del shipped

    model = with_head(body, recipe.seed, recipe.warm_start)
    trainable = freeze_body(model)
    body_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    head_params = sum(p.numel() for p in model.mtp.parameters())
    log(f"head: {head_params / 1e6:.2f}M parameters ({len(trainable)} tensors) on a frozen "
        f"{sum(v.numel() for v in body_before.values()) / 1e6:.2f}M-parameter body")

    per_epoch = (len(examples) + recipe.batch_size - 1) // recipe.batch_size
    batch = data.sft_batch_source(examples, recipe.batch_size, recipe.seed)

    objective = head_objective(recipe.target)
    step_s = _step_seconds(model, batch, objective, per_epoch)
    budget = recipe.minutes * 60
    steps = max(10, int(budget / step_s * 0.97))
    cfg = TrainConfig(steps=steps, batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
                      eval_every=max(20, steps // 8 // 10 * 10), save_every=100, log_every=10, seed=recipe.seed,
                      time_budget_s=budget * 1.1, mtp_weight=1.0)
    log(f"training the head: {steps} steps ({step_s:.2f}s each, ~{steps / per_epoch:.1f} epochs of "
        f"{len(examples):,} chats), target {recipe.target}")
    t = time.time()
    history = train(model, batch, val, cfg, work / "mtp", log=log, objective=objective)
    train_s = time.time() - t

    for k, v in model.state_dict().items():
        if not k.startswith("mtp.") and not torch.equal(v, body_before[k]):
            raise RuntimeError(f"body tensor {k} changed while training the head")
    log("measuring draft accuracy …")
    accuracy = {"greedy_heldout": draft_accuracy(model, greedy),
                "teacher_forced_heldout_chats": draft_accuracy(model, val)}
    log(json.dumps(accuracy))
    saved = save_with_head(model_dir, model, out)
    figures_path = out / "training_figures.json"
    figures = json.loads(figures_path.read_text()) if figures_path.is_file() else {}
    tokens = sum(len(ids) for ids, _ in examples)
    figures["mtp"] = {
        "how": "head only, body frozen", "command": command, "recipe": asdict(recipe),
        "head_parameters": saved["head_parameters"], "steps": history[-1]["step"] if history else 0,
        "train_minutes": round(train_s / 60, 1), "minutes": round((time.time() - started) / 60, 1),
        "data": {"train_chats": len(examples), "train_tokens": tokens, "heldout_chats": len(val_examples),
                 "heldout_prompts": len(heldout), "sft": stats.to_dict()["sft"]},
        "final": history[-1] if history else {}, "draft_accuracy": accuracy,
        "last_eval": next((h for h in reversed(history) if "val_mtp_loss" in h), {}),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    figures_path.write_text(json.dumps(figures, indent=1) + "\n")
    card = out / "MODEL_CARD.md"
    if card.is_file():
        update_card(card, figures["mtp"])
    return figures["mtp"]


def _step_seconds(model: Qwen35Model, batch, objective, per_epoch: int) -> float:
    """Mean time of a few optimizer steps of the head on a throwaway copy (the first one warms up)."""
    import copy

    probe = copy.deepcopy(model)
    opt = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(5):
        t = time.time()
        loss, _, _ = objective(probe, batch((i * 37) % per_epoch, 0, 0, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.time() - t)
    return sum(times[1:]) / len(times[1:])
