"""The training config (paper defaults; see the method notes)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    model: str = _f("", "local Hugging Face checkpoint directory of the base MoE model, or a shipped model: small, v2lite")
    train_data: str | list = _f("", "data to learn: a file (JSON lines/array, parquet, CSV/TSV, arrow; .gz/.bz2/.zst), "
                                "a glob, a folder, a save_to_disk folder, a YAML file of sources, or a list of sources "
                                "{path, format, columns, weight}; layouts messages, sharegpt, alpaca, prompt_completion, "
                                "text (docs: guides/data.md)")
    output_dir: str = _f("", "where checkpoints, logs and the adapter go")
    method: str = _f("esft", "esft (only the experts of expert_config), full (full fine-tuning), lora (PEFT LoRA "
                     "baseline) or esft-lora (LoRA of rank lora_rank on the experts of expert_config only, saved as "
                     "a PEFT adapter)")
    expert_config: str | None = _f(None, "expert_cfg.json from `esft select` (method=esft and method=esft-lora)")
    valid_data: str | list | None = _f(None, "validation data (same forms as train_data); if unset, valid_fraction "
                                       "of train_data is held out")
    data_format: str | None = _f(None, "layout of every source that names none: messages, sharegpt, alpaca, "
                                 "prompt_completion, text, prompt_answers (default: detected per source)")
    skip_bad_rows: bool = _f(False, "drop rows that cannot be converted (counted by reason in the log) instead of "
                             "stopping at the first one")
    data_workers: int = _f(1, "processes tokenizing the data (datasets.map num_proc; the result is cached)")
    streaming: bool = _f(False, "read the data lazily, only the rows the run's steps consume (memory independent "
                         "of the data's size; source weights become sampling probabilities)")
    valid_fraction: float = _f(0.05, "share of train_data held out for validation when valid_data is unset")
    template: str = _f("reference", "prompt template: reference ('User: ...\\n\\nAssistant: ...') or chat (tokenizer's)")
    seq_len: int | None = _f(None, "packed sequence length in tokens (default: the model's context, at most 4096; "
                             "more than the context is refused)")
    overlong: str = _f("truncate", "examples longer than seq_len: truncate or drop (counts are reported)")
    batch_size: int = _f(1, "packed sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    steps: int = _f(500, "optimizer steps")
    lr: float = _f(1e-5, "learning rate (paper: ESFT 1e-5, full fine-tuning 3e-5)")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    warmup_steps: int = _f(0, "linear warmup steps, then constant (paper: constant)")
    eval_every: int = _f(100, "steps between validation-loss evaluations (0 = only at the end)")
    save_every: int = _f(100, "steps between resumable checkpoints (0 = only at the end)")
    keep_checkpoints: int = _f(2, "resumable checkpoints kept on disk (oldest removed)")
    log_every: int = _f(10, "steps between log lines / TensorBoard points")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    dtype: str = _f("auto", "model dtype: auto (bf16 on a GPU with bf16, else fp32), float32, bfloat16 or float16; "
                    "trainable tensors keep fp32 master weights and fp32 AdamW state in any case")
    device: str = _f("auto", "auto, cpu, cuda, cuda:1, ... (where the whole model goes when device_map is unset)")
    device_map: str | None = _f(None, "spread the model over devices: auto, balanced, or a JSON file {module: device}; "
                                "layers mapped to disk can be run through but not trained")
    fsdp_size: int = _f(0, "under torchrun: processes the frozen model is sharded over by FSDP2 (0 = all of them)")
    ep_size: int = _f(1, "under torchrun: expert parallelism, processes the routed experts are split over (divides "
                      "the number of processes and of experts)")
    dist_timeout_s: int = _f(600, "under torchrun: seconds a collective waits for the other processes before the "
                             "job fails with an error (a crashed rank never leaves the others hanging longer)")
    adapter_dtype: str = _f("base", "dtype of the saved adapter: base (the base checkpoint's, e.g. bf16) or float32 "
                            "(the fp32 master weights as trained)")
    seed: int = _f(5934875, "seed for data order and validation split")
    deterministic: bool = _f(False, "deterministic kernels only (torch.use_deterministic_algorithms; on CUDA also "
                                    "CUBLAS_WORKSPACE_CONFIG): GPU runs repeat bit for bit, somewhat slower; ops "
                                    "without a deterministic kernel warn")
    overwrite: bool = _f(False, "replace an existing output_dir")
    resume: bool = _f(False, "continue from the newest checkpoint in output_dir")
    tensorboard: bool = _f(True, "write TensorBoard logs to output_dir/tb")
    allow_other_base: bool = _f(False, "skip the base-model check when resuming")
    router_bias_rate: float = _f(0.0, "Loss-Free Balancing while the router trains (method=full) on a model with a "
                                 "routing bias (e_score_correction_bias: DeepSeek-V3, GLM-4.5, Kimi K2, ...): after each "
                                 "step every expert's bias moves by this rate towards balance (the paper's rule; its "
                                 "pretraining rate is 1e-3). 0 = off (default): the bias stays as pretrained, as "
                                 "DeepSeek-V3 froze it for its last 500B pretraining tokens. Under ESFT the router, "
                                 "bias included, is frozen")
    lora_rank: int = _f(8, "LoRA rank (method=lora; paper: 8, on attention and expert weights; method=esft-lora: "
                        "on each selected expert's gate_up_proj and down_proj, at most their smaller dimension)")
    lora_alpha: int = _f(16, "LoRA alpha (method=lora and esft-lora; the update is scaled by lora_alpha/lora_rank)")
    lora_dropout: float = _f(0.0, "LoRA dropout (method=lora and esft-lora): must be 0, since a LoRA on a fused "
                             "expert weight never sees its input apart (PEFT refuses dropout on target_parameters too)")

    def __post_init__(self):
        """Every value is checked here, before any model or data is read (a refusal costs nothing)."""
        if self.method not in ("esft", "full", "lora", "esft-lora"):
            raise ValueError(f"method must be esft, full, lora or esft-lora, got {self.method!r}")
        if self.method in ("esft", "esft-lora") and not self.expert_config:
            raise ValueError(f"method={self.method} needs expert_config (the expert_cfg.json written by `esft select`"
                             f"{': LoRA goes on its experts only' if self.method == 'esft-lora' else ''})")
        check_range("lora_dropout", self.lora_dropout, low=0, high=1, high_open=True)
        if self.lora_dropout and self.method in ("lora", "esft-lora"):
            raise ValueError(f"lora_dropout={self.lora_dropout}: method={self.method} puts LoRA on the fused expert "
                             "tensors, whose input a weight-space LoRA never sees apart (PEFT refuses lora_dropout on "
                             "target_parameters for the same reason); set lora_dropout=0")
        for name in ("model", "train_data", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        from ..embedded import resolve_model

        self.model = str(resolve_model(self.model))  # a shipped model's name -> its directory
        at_least = {"seq_len": 1 if self.seq_len is not None else None, "data_workers": 1, "batch_size": 1, "grad_accum": 1, "steps": 1, "log_every": 1, "warmup_steps": 0,
                    "eval_every": 0, "save_every": 0, "keep_checkpoints": 0, "fsdp_size": 0, "ep_size": 1,
                    "dist_timeout_s": 1, "lora_rank": 1, "lora_alpha": 1}
        for name, low in at_least.items():
            if low is not None and getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        check_range("lr", self.lr, low=0, high=1, low_open=True)  # AdamW's step is ~lr: above 1 only diverges
        check_range("weight_decay", self.weight_decay, low=0)
        check_range("beta1", self.beta1, low=0, high=1, high_open=True)
        check_range("beta2", self.beta2, low=0, high=1, high_open=True)
        check_range("max_grad_norm", self.max_grad_norm, low=0)
        check_range("valid_fraction", self.valid_fraction, low=0, high=1, high_open=True)
        check_range("router_bias_rate", self.router_bias_rate, low=0)
        if self.router_bias_rate > 0 and self.method != "full":
            raise ValueError(f"router_bias_rate={self.router_bias_rate} moves the routing bias while the router "
                             f"trains, which only method=full does (method={self.method} freezes the router and its "
                             f"bias: the adapter is trained for the base's routing); set router_bias_rate=0")
        if self.template not in ("reference", "chat"):
            raise ValueError(f"template must be reference or chat, got {self.template!r}")
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be truncate or drop, got {self.overlong!r}")
        if self.adapter_dtype not in ("base", "float32"):
            raise ValueError(f"adapter_dtype must be base or float32, got {self.adapter_dtype!r}")
        from ..data.spec import parse_spec
        from ..models.loading import check_device, resolve_dtype

        parse_spec(self.train_data, self.data_format, "train_data")  # the specification's form; files are read later
        if self.valid_data is not None:
            parse_spec(self.valid_data, self.data_format, "valid_data")

        resolve_dtype(self.dtype, "cpu")  # the name only; bf16 support is decided on the device
        check_device(self.device)
        if self.overwrite and self.resume:
            raise ValueError("overwrite and resume exclude each other")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Refuse a non-finite value or one outside [low, high] (open ends excluded), naming the field."""
    import math

    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
