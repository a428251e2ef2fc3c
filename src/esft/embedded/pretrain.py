"""Pretrain the shipped small MoE from scratch on the general domains (CPU is enough).

    python -m esft.embedded.pretrain --out src/esft/embedded/model

Steps: generate the general-domain corpus (esft.tasks, seeded) -> train a byte-level BPE
tokenizer -> build a DeepSeek-V2-architecture MoE (fine-grained routed experts + a shared
expert, dense first layer) -> train with next-token loss, experts kept balanced one of two ways (``--balance``) -> save as a
normal checkpoint directory, weights in bfloat16 (< 25 MB).

Balancing:
- ``aux`` (the shipped model): a load-balancing auxiliary loss, Switch-style, over the router's scores;
- ``loss-free``: Loss-Free Balancing (esft.training.balance): no extra loss; a per-expert routing bias,
  used for the top-k choice only, moves by ``--bias-rate`` towards balance after every step. It needs a
  router that carries such a bias, so the model is built with DeepSeek-V3's architecture (sigmoid gating,
  ``e_score_correction_bias``; everything else as the shipped model), which transformers runs with the bias.

``--gate`` picks the router: softmax (DeepSeek-V2's, the shipped model's) or sigmoid (DeepSeek-V3's;
the default with loss-free). ``--balance aux --gate sigmoid`` is the like-for-like baseline of the
Loss-Free Balancing comparison: the same V3 architecture, its bias left at zero, an auxiliary loss instead.
Every run logs MaxVio per batch and, at the end, the validation loss and global MaxVio on held-out
general-domain examples.

The adaptation tasks are covered only weakly: they make up ``--adaptation-share`` (default 2%)
of the pretraining examples, like a base LLM that has seen JSON and foreign words but was never
trained on these tasks. (With no coverage at all, the frozen embeddings and LM head of a model
this small have never produced tokens such as JSON braces, and no expert subset can learn to.)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from ..data.conversations import encode_reference
from ..data.packing import Example, pack
from ..io import atomic_dir
from ..models.tiny import train_tokenizer
from ..tasks import generate_split, task_names
from ..training.balance import (DEFAULT_BIAS_RATE, LoadMeter, check_bias_rate, maxvio_summary, routing_biases,
                                to_dtype_keeping_bias, update_bias)


# The shapes a model can be pretrained in; each is a set of overrides of the base config below.
# "small" is the shipped default. "v2lite" keeps DeepSeek-V2-Lite's ratios (hidden 2048, 27
# layers, first dense, 64 routed experts of width 1408, top-6, 2 shared, dense width 10944,
# kv_lora_rank 512) at hidden size 128: more MoE layers and fine-grained experts, so the routed
# experts hold most of the parameters (90%; V2-Lite 92%) and ESFT's trainable share is
# the paper's rather than the small model's.
SHAPES: dict[str, dict] = {
    "small": {},
    "v2lite": dict(hidden_size=128, intermediate_size=688, num_hidden_layers=9, n_routed_experts=64,
                   num_experts_per_tok=6, n_shared_experts=2, moe_intermediate_size=88, kv_lora_rank=32),
}


# The router each --gate builds: (model type, its router settings). sigmoid is DeepSeek-V3's router with
# one group (no group-limited routing at 32 experts) and top-k renormalisation, unscaled.
GATES: dict[str, tuple[str, dict]] = {
    "softmax": ("deepseek_v2", dict(topk_method="greedy", norm_topk_prob=False)),
    # topk_method / scoring_func: transformers' V3 class implies them; DeepSeek-V3's config.json states them, and
    # vLLM reads them (without them it would build no bias and score with a softmax)
    "sigmoid": ("deepseek_v3", dict(norm_topk_prob=True, topk_method="noaux_tc", scoring_func="sigmoid")),
}
BALANCES = ("aux", "loss-free")


def model_config(vocab_size: int, bos: int, eos: int, pad: int, shape: str = "small", gate: str = "softmax", **over):
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if gate not in GATES:
        raise ValueError(f"unknown gate {gate!r}; known: {', '.join(GATES)}")
    model_type, router = GATES[gate]
    over = {**router, **SHAPES[shape], **over}
    kw = dict(
        vocab_size=vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        first_k_dense_replace=1, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1,
        moe_intermediate_size=96, kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, tie_word_embeddings=False,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, rope_theta=10000.0,
    )
    kw.update(over)
    return AutoConfig.for_model(model_type, **kw)


def corpus(n_per_task: int, seed: int, adaptation_share: float = 0.02) -> tuple[list[tuple[str, str]], list[str]]:
    """(prompt, answer) pairs: the general domains plus a small share of the adaptation tasks'
    training splits; and the tokenizer's training text (all tasks)."""
    pairs = []
    for name in task_names("general"):
        pairs += generate_split(name, "train", n_per_task, seed)
    adapt = task_names("adaptation")
    n_adapt = int(len(pairs) * adaptation_share / max(1 - adaptation_share, 1e-9) / len(adapt))
    for name in adapt:
        pairs += generate_split(name, "train", n_adapt, seed + 1)  # eval prompts never occur in train splits
    random.Random(seed).shuffle(pairs)
    tok_text = [p + " " + a for p, a in pairs[:20000]]
    for name in adapt:
        tok_text += [p + " " + a for p, a in generate_split(name, "train", 2000, seed)]
    tok_text += ["User: \n\nAssistant:"] * 50
    return pairs, tok_text


def valid_rows(tokenizer, n_per_task: int, seed: int, seq_len: int):
    """Held-out general-domain examples (the tasks' valid splits), shuffled (a batch mixes the domains, as a
    training batch does) and packed as the training data is."""
    examples = []
    for name in task_names("general"):
        for p, ans in generate_split(name, "valid", n_per_task, seed):
            ids, _ = encode_reference([{"role": "user", "content": p}, {"role": "assistant", "content": ans}],
                                      tokenizer)
            examples.append(Example(ids, list(ids)))
    random.Random(seed).shuffle(examples)
    return pack(examples, seq_len, tokenizer.pad_token_id)


def sigmoid_balance_loss(router_logits, top_k: int, mask: torch.Tensor) -> torch.Tensor:
    """The auxiliary balance loss for sigmoid routers (DeepSeek-V3's form, over the batch), mean over layers.

    Per layer, from logits [N, E] over the batch's real tokens: f_i = E / (K N) * (tokens choosing expert i),
    P_i = mean over tokens of s_i / sum_j s_j (s = sigmoid of the logits), loss = sum_i f_i P_i (1 when
    perfectly balanced). The choice is the top-k of the logits (the bias stays at zero in an aux run).
    """
    keep = mask.reshape(-1).bool()
    total = 0.0
    for logits in router_logits:
        logits = logits.float()[keep.to(logits.device)]  # [N, E]
        n, e = logits.shape
        s = logits.sigmoid()
        p = (s / s.sum(dim=-1, keepdim=True)).mean(dim=0)  # [E]
        chosen = torch.bincount(logits.topk(top_k, dim=-1).indices.reshape(-1), minlength=e).float()
        total = total + (chosen * e / (top_k * n) * p).sum()
    return total / len(router_logits)


@torch.no_grad()
def validate(model, rows, batch_size: int, device: str) -> dict:
    """Validation loss (token mean) and global MaxVio (loads summed over the whole set) of ``model``."""
    was_training = model.training
    model.eval()
    labels = rows.input_ids.masked_fill(rows.attention_mask == 0, -100)
    loss_sum, n_tok, load, per_batch = 0.0, 0, {}, []
    with LoadMeter(model) as meter:
        for i in range(0, len(rows), batch_size):
            ids, att = rows.input_ids[i:i + batch_size].to(device), rows.attention_mask[i:i + batch_size].to(device)
            lab = labels[i:i + batch_size].to(device)
            meter.begin_batch(att)
            out = model(input_ids=ids, attention_mask=att, labels=lab, use_cache=False)
            n = int((lab[:, 1:] != -100).sum())
            loss_sum += float(out.loss) * n
            n_tok += n
            batch = meter.take()
            per_batch.append(maxvio_summary(batch)["mean"])
            load = {l: c + load[l] if l in load else c for l, c in batch.items()}
    model.train(was_training)
    per_batch = [v for v in per_batch if v is not None]
    return {"loss": round(loss_sum / max(n_tok, 1), 5), "tokens": n_tok, "maxvio_global": maxvio_summary(load),
            "maxvio_batch_mean": round(sum(per_batch) / len(per_batch), 4) if per_batch else None,
            "batch_size": batch_size, "load": {str(l): c.tolist() for l, c in sorted(load.items())}}


# arguments that do not change the result (a run may resume with other values of these)
RUN_ONLY_ARGS = ("out", "threads", "save_every", "state_dir", "device")


class PretrainState:
    """The resumable state of one pretraining run: one file, replaced atomically every save.

    ``key`` holds the arguments that shape the result; a state written under other arguments is
    refused (naming the differences) rather than silently continued.
    """

    def __init__(self, path: Path, key: dict):
        self.path, self.key = Path(path), key

    def load(self) -> dict | None:
        f = self.path / "state.pt"
        if not f.exists():
            return None
        st = torch.load(f, weights_only=False)
        diff = {k: (st["key"].get(k), v) for k, v in self.key.items() if st["key"].get(k) != v}
        if diff:
            raise SystemExit(f"{f} was written by a run with other settings "
                             f"({', '.join(f'{k}: {old!r} there, {new!r} now' for k, (old, new) in diff.items())}); "
                             "delete it or pass --state-dir elsewhere")
        return st

    def save(self, st: dict) -> None:
        import os

        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / "state.pt.tmp"
        torch.save({**st, "key": self.key}, tmp)
        os.replace(tmp, self.path / "state.pt")  # a crash mid-save leaves the previous state

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


def main(argv=None) -> int:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="checkpoint directory to write (replaced atomically)")
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES),
                    help="model shape: small (the shipped default) or v2lite (DeepSeek-V2-Lite's proportions)")
    ap.add_argument("--steps", type=int, default=2400, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=16, help="packed rows per step")
    ap.add_argument("--seq-len", type=int, default=256, help="packed row length in tokens")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup, then cosine to 10%%)")
    ap.add_argument("--warmup", type=int, default=100, help="warmup steps")
    ap.add_argument("--balance", default="aux", choices=BALANCES,
                    help="how experts are kept balanced: aux (an auxiliary loss; the shipped model) or loss-free "
                         "(Loss-Free Balancing: a routing bias moved towards balance after every step, no extra loss)")
    ap.add_argument("--gate", default=None, choices=sorted(GATES),
                    help="router: softmax (DeepSeek-V2's; default with aux) or sigmoid (DeepSeek-V3's, with a routing "
                         "bias; default with loss-free, which needs it)")
    ap.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss coefficient (--balance aux)")
    ap.add_argument("--bias-rate", type=float, default=DEFAULT_BIAS_RATE,
                    help="Loss-Free Balancing's bias update rate u: after each step every expert's bias moves by u "
                         "towards balance (--balance loss-free; the paper's default 1e-3)")
    ap.add_argument("--valid-per-task", type=int, default=200,
                    help="held-out examples per general domain for the final validation loss and global MaxVio")
    ap.add_argument("--examples-per-task", type=int, default=40000, help="training examples per general domain")
    ap.add_argument("--adaptation-share", type=float, default=0.02,
                    help="share of pretraining examples drawn from the adaptation tasks (weak coverage)")
    ap.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size")
    ap.add_argument("--seed", type=int, default=0, help="seed for data, init and order")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--save-every", type=int, default=100,
                    help="steps between resumable states (0 = never); an interrupted run resumes from the last one")
    ap.add_argument("--state-dir", default=None,
                    help="where the resumable state lives (default: runs/pretrain-state/<name of --out>); it is "
                         "removed once the checkpoint is written")
    a = ap.parse_args(argv)
    a.gate = a.gate or ("sigmoid" if a.balance == "loss-free" else "softmax")
    if a.balance == "loss-free" and a.gate != "sigmoid":
        ap.error(f"--balance loss-free needs a router with a routing bias: --gate {a.gate} builds "
                 f"{GATES[a.gate][0]}, whose router has none; use --gate sigmoid ({GATES['sigmoid'][0]}: "
                 "sigmoid gating with e_score_correction_bias)")
    try:
        check_bias_rate(a.bias_rate, "--bias-rate")
    except ValueError as e:
        ap.error(str(e))
    if a.balance == "aux":  # a rate or coefficient the run does not use is not part of what shapes it
        a.bias_rate = None
    else:
        a.aux_coef = None
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    torch.use_deterministic_algorithms(True)  # same seed -> same checkpoint, not merely a similar one
    random.seed(a.seed)
    torch.manual_seed(a.seed)

    pairs, tok_text = corpus(a.examples_per_task, a.seed, a.adaptation_share)
    tokenizer = train_tokenizer(tok_text, vocab_size=a.vocab_size)
    examples = []
    for p, ans in pairs:
        msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": ans}]
        ids, _ = encode_reference(msgs, tokenizer)
        examples.append(Example(ids, list(ids)))  # pretraining: every token is predicted
    data = pack(examples, a.seq_len, tokenizer.pad_token_id)
    labels = data.input_ids.masked_fill(data.attention_mask == 0, -100)
    print(f"corpus: {data.stats.describe()}; tokenizer vocab {len(tokenizer)}; {time.time() - t0:.0f}s")

    valid = valid_rows(tokenizer, a.valid_per_task, a.seed, a.seq_len)
    cfg = model_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, a.shape,
                       a.gate)
    model = AutoModelForCausalLM.from_config(cfg).to(a.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    g = torch.Generator().manual_seed(a.seed)
    order = torch.randperm(len(data), generator=g)
    meter = LoadMeter(model).__enter__()  # loads per layer, per step: MaxVio, and the loss-free update
    biases = routing_biases(model) if a.balance == "loss-free" else {}
    model.train()
    log = []
    state = PretrainState(Path(a.state_dir) if a.state_dir else Path("runs/pretrain-state") / Path(a.out).name,
                          {k: v for k, v in vars(a).items() if k not in RUN_ONLY_ARGS})
    first, elapsed, maxvio_sum = 0, 0.0, 0.0
    resumed = state.load()
    if resumed:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["opt"])
        order, log, first, elapsed = resumed["order"], resumed["log"], resumed["step"], resumed["seconds"]
        maxvio_sum = resumed["maxvio_sum"]
        g.set_state(resumed["generator"])
        print(f"resumed from {state.path} at step {first}")
    t_run = time.time()
    bar = tqdm(range(first, a.steps), desc="pretrain", dynamic_ncols=True, initial=first, total=a.steps)
    for step in bar:
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        start = (step * a.batch_size) % len(data)
        rows = order[start:start + a.batch_size]
        if len(rows) < a.batch_size:
            order = torch.randperm(len(data), generator=g)
            rows = order[: a.batch_size]
        ids, att, lab = data.input_ids[rows].to(a.device), data.attention_mask[rows].to(a.device), labels[rows].to(a.device)
        meter.begin_batch(att)
        out = model(input_ids=ids, attention_mask=att, labels=lab, output_router_logits=a.balance == "aux",
                    use_cache=False)
        loss = out.loss
        if a.balance == "aux":
            aux = (load_balancing_loss_func(out.router_logits, E, K, att) if a.gate == "softmax"
                   else sigmoid_balance_loss(out.router_logits, K, att))
            loss = loss + a.aux_coef * aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        load = meter.take()
        for l, b in biases.items():  # Loss-Free Balancing: after the step, from the step's load
            update_bias(b, load[l], a.bias_rate)
        maxvio = maxvio_summary(load)["mean"] or 0.0
        maxvio_sum = maxvio_sum + maxvio
        if step % 20 == 0 or step == a.steps - 1:
            rec = {"step": step, "loss": float(out.loss.detach()), "maxvio_batch": maxvio, "lr": lr}
            if a.balance == "aux":
                rec["aux"] = float(aux.detach())
            log.append(rec)
            bar.set_postfix(loss=f"{float(out.loss.detach()):.3f}", maxvio=f"{maxvio:.2f}")
        if a.save_every and (step + 1) % a.save_every == 0 and step + 1 < a.steps:
            state.save({"step": step + 1, "model": model.state_dict(), "opt": opt.state_dict(), "order": order,
                        "generator": g.get_state(), "log": log, "seconds": elapsed + time.time() - t_run,
                        "maxvio_sum": maxvio_sum})
    bar.close()
    meter.__exit__(None, None, None)
    train_seconds = elapsed + time.time() - t_run
    result = {"maxvio_batch_mean": round(maxvio_sum / max(a.steps, 1), 4),
              "valid": validate(model, valid, a.batch_size, a.device)}
    print(f"validation loss {result['valid']['loss']:.4f}, global MaxVio {result['valid']['maxvio_global']['mean']:.3f} "
          f"(mean over layers), batch MaxVio {result['maxvio_batch_mean']:.3f} (mean over steps and layers)")

    model.eval()
    with atomic_dir(a.out) as tmp:
        to_dtype_keeping_bias(model, torch.bfloat16).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "pretrain_log.json").write_text(json.dumps({
            "args": {k: v for k, v in vars(a).items() if k not in ("state_dir",)}, "params": n_params,
            "seconds": round(time.time() - t0, 1) if not resumed else None,
            "train_seconds": round(train_seconds, 1), "resumed_at_step": first or None,
            "threads": torch.get_num_threads(), "corpus": data.stats.describe(), **result, "log": log}, indent=1))
    state.clear()
    print(f"wrote {a.out} in {time.time() - t0:.0f}s ({train_seconds:.0f}s of training steps"
          + (f", resumed at step {first})" if first else ")"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
