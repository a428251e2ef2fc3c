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

import torch

from ..data.conversations import encode_reference
from ..data.packing import Example, pack
from ..io import atomic_dir
from ..models.tiny import train_tokenizer
from ..tasks import generate_split, task_names


def model_config(vocab_size: int, bos: int, eos: int, pad: int, **over):
    from transformers import AutoConfig

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


def main(argv=None) -> int:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="checkpoint directory to write (replaced atomically)")
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

    cfg = model_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg).to(a.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    g = torch.Generator().manual_seed(a.seed)
    order = torch.randperm(len(data), generator=g)
    model.train()
    log = []
    bar = tqdm(range(a.steps), desc="pretrain", dynamic_ncols=True)
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
    bar.close()

    model.eval()
    with atomic_dir(a.out) as tmp:
        model.to(torch.bfloat16).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "pretrain_log.json").write_text(json.dumps({
            "args": vars(a), "params": n_params, "seconds": round(time.time() - t0, 1),
            "corpus": data.stats.describe(), "log": log}, indent=1))
    print(f"wrote {a.out} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
