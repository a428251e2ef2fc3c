"""Pretrain the shipped small MoE from scratch on the general domains (CPU is enough).

    python -m esft.embedded.pretrain --out src/esft/embedded/model

Steps: generate the general-domain corpus (esft.tasks, seeded) -> train a byte-level BPE
tokenizer -> build a DeepSeek-V2-architecture MoE (fine-grained routed experts + a shared
expert, dense first layer) -> train with next-token loss + a load-balancing auxiliary loss
(transformers' Switch-style loss over the router logits the model returns) so that experts
stay balanced -> save as a normal checkpoint directory, weights in bfloat16 (< 25 MB).

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


def model_config(vocab_size: int, bos: int, eos: int, pad: int, shape: str = "small", **over):
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    over = {**SHAPES[shape], **over}
    kw = dict(
        vocab_size=vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        first_k_dense_replace=1, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1,
        moe_intermediate_size=96, kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False, tie_word_embeddings=False,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, rope_theta=10000.0,
    )
    kw.update(over)
    return AutoConfig.for_model("deepseek_v2", **kw)


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
    ap.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss coefficient")
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

    cfg = model_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, a.shape)
    model = AutoModelForCausalLM.from_config(cfg).to(a.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    g = torch.Generator().manual_seed(a.seed)
    order = torch.randperm(len(data), generator=g)
    model.train()
    log = []
    state = PretrainState(Path(a.state_dir) if a.state_dir else Path("runs/pretrain-state") / Path(a.out).name,
                          {k: v for k, v in vars(a).items() if k not in RUN_ONLY_ARGS})
    first, elapsed = 0, 0.0
    resumed = state.load()
    if resumed:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["opt"])
        order, log, first, elapsed = resumed["order"], resumed["log"], resumed["step"], resumed["seconds"]
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
        out = model(input_ids=ids, attention_mask=att, labels=lab, output_router_logits=True, use_cache=False)
        aux = load_balancing_loss_func(out.router_logits, E, K, att)
        (out.loss + a.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == a.steps - 1:
            log.append({"step": step, "loss": float(out.loss.detach()), "aux": float(aux.detach()), "lr": lr})
            bar.set_postfix(loss=f"{float(out.loss.detach()):.3f}", aux=f"{float(aux.detach()):.3f}")
        if a.save_every and (step + 1) % a.save_every == 0 and step + 1 < a.steps:
            state.save({"step": step + 1, "model": model.state_dict(), "opt": opt.state_dict(), "order": order,
                        "generator": g.get_state(), "log": log, "seconds": elapsed + time.time() - t_run})
    bar.close()
    train_seconds = elapsed + time.time() - t_run

    model.eval()
    with atomic_dir(a.out) as tmp:
        model.to(torch.bfloat16).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "pretrain_log.json").write_text(json.dumps({
            "args": {k: v for k, v in vars(a).items() if k not in ("state_dir",)}, "params": n_params,
            "seconds": round(time.time() - t0, 1) if not resumed else None,
            "train_seconds": round(train_seconds, 1), "resumed_at_step": first or None,
            "threads": torch.get_num_threads(), "corpus": data.stats.describe(), "log": log}, indent=1))
    state.clear()
    print(f"wrote {a.out} in {time.time() - t0:.0f}s ({train_seconds:.0f}s of training steps"
          + (f", resumed at step {first})" if first else ")"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
