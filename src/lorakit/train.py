"""Training: recipe -> LoraConfig + SFTConfig -> trl.SFTTrainer -> adapter in the store."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lorakit import adapters, attention, models, runs, runtime
from lorakit.data import Prepared, content_hash, prepare, prompt_style
from lorakit.errors import LorakitError
from lorakit.recipe import Recipe

log = logging.getLogger("lorakit")


@dataclass
class Plan:
    """Hardware-dependent choices the recipe left on `auto`, resolved once and logged."""

    device: torch.device
    precision: str  # "bf16" | "fp16" | "fp32"
    gradient_checkpointing: bool
    notes: list[str] = field(default_factory=list)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def make_plan(recipe: Recipe, dev: torch.device | None = None) -> Plan:
    dev = dev or models.device()
    t = recipe.train
    cuda = dev.type == "cuda"
    if t.precision == "auto":
        if cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_bf16() else "fp32"
    else:
        precision = t.precision
    if precision == "fp16" and not cuda:
        raise LorakitError("train.precision fp16 needs a GPU; on the CPU use bf16 or fp32")
    # A quantized base is chosen for memory: there checkpointing is worth its recomputation on the CPU too
    # (measured, QLoRA on SmolLM2-135M: 40-46% less peak memory for 11-25% fewer tokens/s).
    auto = cuda or recipe.base_model.quantization != "none"
    gc = {"on": True, "off": False, "auto": auto}[t.gradient_checkpointing]
    return Plan(dev, precision, gc)


# Rows of logits per chunk: about 8M logits (32 MB in fp32) whatever the vocabulary.
CHUNK_LOGITS = 1 << 23


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias` against `targets`, a few rows at a time.

    Each chunk's logits are computed in `dtype` (the dtype the model's own head would use), upcast to fp32 like
    transformers' loss, and turned into the gradient of the hidden states at once: neither the full logits nor
    their gradient ever exist, and the backward only scales the stored gradient (no recomputation).
    The head's weights get no gradient (lorakit uses this path only for a frozen head).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype, rows):
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        n, vocab = hidden.shape[0], w.shape[0]
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty((n, w.shape[1]), dtype=dtype, device=hidden.device) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Every chunk has the same shape, the last one padded with zero rows: the CPU's matmul library (oneDNN)
        # builds and caches kernels and reordered weights per shape, and a last chunk of a new size at every
        # step grew the process by tens of MB a step. One set of buffers serves every chunk (a fresh 30-MB block
        # per chunk costs its page faults each time).
        step = min(rows, n)
        h = torch.zeros((step, w.shape[1]), dtype=dtype, device=hidden.device)
        logits = torch.empty((step, vocab), dtype=dtype, device=hidden.device)
        upcast = (
            torch.empty((step, vocab), dtype=torch.float32, device=hidden.device) if dtype != torch.float32 else None
        )
        logp = torch.empty((step, vocab), dtype=torch.float32, device=hidden.device)
        probs = torch.empty((step, vocab), dtype=dtype, device=hidden.device) if want_grad else None
        part = torch.empty((step, w.shape[1]), dtype=dtype, device=hidden.device) if want_grad else None
        for start in range(0, n, rows):
            t = targets[start : start + rows]
            k = len(t)
            if k < step:
                h.zero_()
            h[:k] = hidden[start : start + k]
            torch.mm(h, w.t(), out=logits) if b is None else torch.addmm(b, h, w.t(), out=logits)
            full = logits[:k] if upcast is None else upcast[:k].copy_(logits[:k])
            torch.ops.aten._log_softmax.out(full, 1, False, out=logp[:k])
            picked = logp[:k].gather(1, t[:, None]).squeeze(1)
            total -= picked.sum()
            if want_grad:
                torch.exp(logp[:k], out=probs[:k])  # softmax
                probs[:k][torch.arange(k, device=t.device), t] = (picked.exp() - 1).to(dtype)
                if k < step:
                    probs[k:].zero_()
                torch.mm(probs, w, out=part)
                grad[start : start + k] = part[:k]
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total).to(ctx.hidden_dtype), None, None, None, None, None


def chunked_lm_loss(hidden, labels, head, dtype, num_items_in_batch=None):
    """transformers' causal-LM loss (next-token cross-entropy, labels -100 ignored) from the final hidden states.

    Only supervised positions are projected through the head. The mean is over the supervised tokens, or a sum
    divided by `num_items_in_batch` when given (gradient accumulation), exactly as the model's own loss.
    """
    targets = labels[:, 1:]
    mask = targets != -100
    rows = max(1, CHUNK_LOGITS // head.weight.shape[0])
    total = _ChunkedCrossEntropy.apply(hidden[:, :-1][mask], head.weight, head.bias, targets[mask], dtype, rows)
    if num_items_in_batch is None:
        return total / mask.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class _LastHidden:
    """Holds the decoder body's output during one forward, and the dtype the head computes in there."""

    def __init__(self, body):
        self.body = body
        self.hidden = self.dtype = None

    def __enter__(self):
        self.handle = self.body.register_forward_hook(self._seen)
        return self

    def _seen(self, module, args, output):
        self.hidden = output[0]
        kind = self.hidden.device.type
        self.dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None

    def __exit__(self, *exc):
        self.handle.remove()


def chunked_loss_parts(model):
    """(decoder body, output head) when the chunked loss reproduces this model's own loss, else None.

    Needs a frozen plain linear head, a body under `base_model_prefix`, the standard causal-LM loss and
    `logits_to_keep`; then one forward on a few tokens checks that the model's logits are head(body(x))
    (models that scale or soft-cap their logits are left on their own loss).
    """
    import inspect

    from transformers.loss.loss_utils import ForCausalLMLoss

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    body = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    if type(head) is not torch.nn.Linear or any(p.requires_grad for p in head.parameters()):
        return None
    if not isinstance(body, torch.nn.Module) or body is lm or getattr(lm, "loss_function", None) is not ForCausalLMLoss:
        return None
    if "logits_to_keep" not in inspect.signature(type(lm).forward).parameters:
        return None
    ids = torch.randint(0, head.weight.shape[0], (1, 8), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.train()  # an eval-mode forward would repack 4-bit weights on the CPU (models.keep_4bit_trainable_on_cpu)
    try:
        with torch.no_grad(), _LastHidden(body) as seen:
            logits = model(input_ids=ids.to(head.weight.device), use_cache=False).logits
            ours = head(seen.hidden.to(head.weight.dtype))
    finally:
        model.train(was_training)
    if logits.shape != ours.shape:
        return None
    scale = ours.float().abs().max().clamp(min=1e-12)
    return (body, head) if (logits.float() - ours.float()).abs().max() <= 1e-3 * scale else None


def sft_trainer_class():
    """SFTTrainer with the model's own loss, computed in chunks, instead of TRL's fused, chunked LM head.

    TRL computes log-probs, entropy and top-1 accuracy in vocabulary tiles for its logged metrics; on the CPU
    that halves training speed (measured: 135 vs 228 tokens/s on SmolLM2-135M). lorakit runs the decoder body,
    then the head and the cross-entropy over chunks of supervised tokens (`chunked_lm_loss`): the same loss and
    gradients as the model's own, without the [tokens, vocabulary] logits and their gradient in memory.
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class LorakitSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled  # the head's weight is not whole there
            self.chunked_head = None if sharded else chunked_loss_parts(self.model)
            if not sharded:  # FSDP/DeepSpeed flatten parameters by dtype: leave TRL's choice there
                runtime.adapter_in_float32(self.model)
            if self.args.bf16 or self.args.fp16:
                runtime.keep_lora_inputs_as_they_come(self.model)
                runtime.quantized_outputs_in_compute_dtype(self.model)
            self.row_multiple = attention.ROW_MULTIPLE if attention.uses_packed_attention(self.model) else 0
            tok = self.processing_class
            pad = getattr(tok, "pad_token_id", None)
            self.pad_id = pad if pad is not None else (getattr(tok, "eos_token_id", None) or 0)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.row_multiple:
                inputs = attention.pad_packed_row(inputs, self.row_multiple, self.pad_id)
            inputs["use_cache"] = False
            plain = self.chunked_head is None or return_outputs or "labels" not in inputs or "shift_labels" in inputs
            if plain or self.label_smoother is not None or self.compute_loss_func is not None:
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            body, head = self.chunked_head
            with _LastHidden(body) as seen:
                # The head runs on one position only: the loss is computed from the body's output below.
                model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=1)
            # Like Trainer.compute_loss: the model divides by num_items_in_batch only when it accepts loss kwargs.
            items = num_items_in_batch if self.model_accepts_loss_kwargs else None
            loss = chunked_lm_loss(seen.hidden, inputs["labels"], head, seen.dtype or head.weight.dtype, items)
            if self.args.average_tokens_across_devices and items is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return loss

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            if self.args.device.type == "cpu":
                runtime.release_freed_memory()
            return loss

        def _save_checkpoint(self, model, trial):
            """Write the checkpoint in a staging folder, flush it, mark it complete, rename it into place.

            With several processes each writes its own files (its RNG state; its shards under FSDP/DeepSpeed)
            into the staging folder; the main process publishes the checkpoint once all of them are done.
            """
            run_dir = Path(self.args.output_dir)
            staging = run_dir / runs.STAGING
            if self.is_world_process_zero():
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self.args.output_dir = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = str(run_dir)
            self.accelerator.wait_for_everyone()
            if self.is_world_process_zero():
                runs.publish(staging / f"checkpoint-{self.state.global_step}", run_dir)
            self.accelerator.wait_for_everyone()

    return LorakitSFTTrainer


def build_lora_config(recipe: Recipe, targets: list[str] | str, fan_in_fan_out: bool):
    from peft import LoraConfig

    lora = recipe.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha if lora.alpha is not None else 2 * lora.r,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        modules_to_save=lora.modules_to_save or None,
        fan_in_fan_out=fan_in_fan_out,
        task_type="CAUSAL_LM",
    )


def build_sft_config(recipe: Recipe, out_dir: Path, plan: Plan, packing: bool, has_eval: bool, eval_first=False):
    from trl import SFTConfig

    t = recipe.train
    return SFTConfig(
        output_dir=str(out_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_every,
        logging_first_step=True,
        eval_strategy="steps" if (t.eval_every and has_eval) else "no",
        eval_steps=t.eval_every,
        eval_on_start=has_eval and eval_first,
        save_strategy="steps" if t.save_every else "no",
        save_steps=t.save_every or 500,
        save_total_limit=None,  # lorakit prunes, never deleting the newest complete checkpoint
        report_to="none",
        disable_tqdm=True,
        max_length=recipe.data.block_size,
        packing=packing,
        packing_strategy="bfd",
        shuffle_dataset=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        use_cpu=plan.device.type == "cpu",
    )


def packing_is_isolated(model) -> bool:
    """Do packed documents stay apart? Compare a document's logits alone and packed after another."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    first = torch.randint(3, vocab, (1, 5), generator=g)
    second = torch.randint(3, vocab, (1, 6), generator=g)
    dev = next(p.device for p in model.parameters())
    packed = torch.cat([first, second], dim=1).to(dev)
    positions = torch.cat([torch.arange(5), torch.arange(6)])[None].to(dev)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        # No KV cache: transformers only separates packed documents when no cache is passed.
        alone = model(input_ids=second.to(dev), use_cache=False).logits.float()
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[:, 5:].float()
    model.train(was_training)
    scale = alone.abs().max().clamp(min=1.0)
    return bool(((alone - together).abs().max() / scale) < 1e-2)


class NullDisplay:
    def step(self, state) -> None: ...

    def log(self, row: dict, state) -> None: ...


class RunLog(TrainerCallback):
    """Writes every log line to runs/<name>/metrics.jsonl and keeps the ones the summary needs."""

    def __init__(self, path: Path, display):
        self.path = path
        self.display = display
        self.last_time: float | None = None
        self.last_tokens = 0
        self.history: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, **kw):
        self.last_time = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or logs is None:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
        now = time.perf_counter()
        if "loss" in logs and self.last_time is not None:
            seen = state.num_input_tokens_seen
            row["tokens_seen"] = seen
            row["tokens_per_second"] = round((seen - self.last_tokens) / max(now - self.last_time, 1e-9), 1)
            self.last_time, self.last_tokens = now, seen
        elif "eval_loss" in logs:  # evaluation time is not training time
            self.last_time, self.last_tokens = now, state.num_input_tokens_seen
        row["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.history.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.display.log(row, state)

    def on_step_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            self.display.step(state)


@dataclass
class TrainResult:
    name: str
    path: Path
    metrics: dict[str, Any]
    meta: dict[str, Any]


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("lorakit", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def method_name(recipe: Recipe) -> str:
    kind = "DoRA" if recipe.lora.use_dora else "LoRA"
    return {"4bit": "QLoRA", "8bit": f"{kind} (8-bit base)"}.get(recipe.base_model.quantization, kind)


def preflight(recipe: Recipe, overwrite: bool):
    """Everything that can fail on the user's input, checked before model weights are read."""
    store = Path(recipe.output.store)
    if adapters.exists(store, recipe.adapter_name) and not overwrite:
        raise LorakitError(
            f"adapter {recipe.adapter_name!r} already exists in {store.resolve()}; "
            "use --overwrite to replace it or set output.name"
        )
    ref = models.resolve(recipe.base_model.name, recipe.base_model.revision)
    skeleton = models.skeleton(ref, recipe.base_model.trust_remote_code)
    models.check_quantizable(skeleton, recipe.base_model)
    targets, fan_in_fan_out = models.choose_targets(skeleton, recipe.lora.target_modules)
    tokenizer = models.load_tokenizer(ref, recipe.base_model.trust_remote_code)
    data = prepare(recipe.data, tokenizer, recipe.train.seed)
    return ref, skeleton.config, targets, fan_in_fan_out, tokenizer, data


def load_base(recipe: Recipe, ref: models.ModelRef, plan: Plan):
    """Load the base model for training and settle packing (kept only if documents stay apart)."""
    precision_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[plan.precision]
    compute_name = precision_dtype if recipe.base_model.compute_dtype == "auto" else recipe.base_model.compute_dtype
    section = recipe.base_model
    if section.dtype == "auto" and plan.precision == "bf16" and section.quantization in ("none", "4bit"):
        # Autocast would round every frozen weight to bf16 at every use anyway (frozen weights are not in
        # its cache): hold them in bf16 once, as on a GPU. The adapter itself stays fp32 (peft upcasts it).
        # A 4-bit base keeps what it does not quantize (embeddings, norms) in bf16 too, as on a GPU: in float32
        # the residual stream stayed float32 and every 4-bit layer answered in float32 (QLoRA on SmolLM2-135M,
        # CPU: 2.64 vs 3.95 s a step, peak RSS 1396 vs 1561 MB, eval loss 3.270 vs 3.251 after 40 steps).
        section = section.model_copy(update={"dtype": "bfloat16"})
        if plan.device.type == "cpu":
            plan.notes.append("frozen base weights held in bf16")
    model = models.load_model(ref, section, compute=models.torch_dtype(compute_name), dev=plan.device)
    model.config.use_cache = False
    if plan.device.type == "cpu":
        models.keep_4bit_trainable_on_cpu(model)
    packing = recipe.data.packing
    if packing and not packing_is_isolated(model):
        packing = False
        plan.notes.append("this model's attention mixes packed documents: packing turned off (one document per row)")
    elif packing:
        plan.notes.append("packing: documents packed padding-free, attention kept within each document")
        on_cpu_auto = plan.device.type == "cpu" and recipe.base_model.attn_implementation == "auto"
        if on_cpu_auto and attention.use_packed_attention(model):
            if packing_is_isolated(model):
                plan.notes.append("attention computed per document")
            else:
                model.set_attn_implementation("sdpa")
    return model, packing


def prepare_run_dir(recipe: Recipe, key: dict, overwrite: bool, resume: bool, force: bool):
    """runs/<name>/: fresh for a new run, or the newest complete checkpoint to resume from."""
    run_dir = Path(recipe.output.runs_dir) / recipe.adapter_name
    if resume:
        ckpt, info = runs.find_resume(run_dir, key, force)
        return run_dir, str(ckpt), info
    runs.check_fresh_start(run_dir, overwrite)
    if run_dir.exists() and is_main_process():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None, {}


def is_main_process() -> bool:
    """Rank 0 under torchrun/accelerate (the only process that writes run files and adapters)."""
    return int(os.environ.get("RANK", "0")) == 0


def _quiet(message: str) -> None:
    """What the other processes of a distributed run say: nothing (the main process speaks for all)."""


def check_launch(recipe: Recipe) -> None:
    """Refuse, before anything loads, a launch that shards weights lorakit keeps quantized."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":  # set by `accelerate launch`
        sharding = "FSDP"
    elif os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        sharding = "DeepSpeed ZeRO-3"
    else:
        return
    if recipe.base_model.quantization != "none":
        raise LorakitError(
            f"base_model.quantization {recipe.base_model.quantization} cannot be combined with {sharding}: "
            "lorakit keeps quantized weights as integers, which it cannot shard; "
            "train a quantized base with DDP instead (examples/multi-gpu/ddp.yaml, or torchrun)"
        )


def train(
    recipe: Recipe, *, overwrite: bool = False, resume: bool = False, force: bool = False, show=None, say=print
) -> TrainResult:
    """Run one recipe end to end and write its adapter to the store."""
    say = say if is_main_process() else _quiet
    check_launch(recipe)
    if not torch.cuda.is_available():
        runtime.bound_cpu_kernel_cache()
    ref, config, targets, fan_in_fan_out, tokenizer, data = preflight(recipe, overwrite or resume)
    key = runs.resume_key(recipe, models.weights_fingerprint(ref), content_hash(recipe.data))
    run_dir, resume_from, run_info = prepare_run_dir(recipe, key, overwrite, resume, force)
    plan = make_plan(recipe)
    say(f"base model: {recipe.base_model.name} ({models.describe(ref)}, {config.model_type})")
    say(f"target modules: {', '.join(targets) if isinstance(targets, list) else targets}")
    say(_data_summary(data))
    model, packing = load_base(recipe, ref, plan)
    say(
        f"device {plan.device}, precision {plan.precision}, gradient checkpointing "
        f"{'on' if plan.gradient_checkpointing else 'off'}; " + "; ".join(plan.notes)
    )
    train_ds, eval_ds = data.datasets()
    stop = runs.GracefulStop(say)
    info = (
        run_info
        if resume_from
        else {"resume_key": key, "eval_loss_before": None, "recipe": recipe.model_dump(mode="json")}
    )
    before = runs.EvalBefore(run_dir, info)
    trainer = sft_trainer_class()(
        model=model,
        args=build_sft_config(recipe, run_dir, plan, packing, eval_ds is not None, eval_first=not resume_from),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=build_lora_config(recipe, targets, fan_in_fan_out),
        callbacks=[RunLog(run_dir / "metrics.jsonl", show or NullDisplay()),
                   runs.Checkpoints(run_dir, recipe.train.keep_checkpoints), stop, before],
    )  # fmt: skip
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    if resume_from:
        say(f"resuming from {resume_from}")
    elif is_main_process():
        runs.write_run(run_dir, info)  # the evaluation before the first step adds its loss (runs.EvalBefore)
    started = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=resume_from)
    if stop.stopping:
        done = runs.checkpoints(run_dir)
        raise runs.Interrupted(trainer.state.global_step, done[-1] if done else None)
    elapsed = time.perf_counter() - started - before.seconds
    eval_after = trainer.evaluate()["eval_loss"] if eval_ds is not None else None
    metrics = {
        "train_loss": out.training_loss,
        "eval_loss_before": before.loss,
        "eval_loss_after": eval_after,
        "eval_perplexity_after": math.exp(eval_after) if eval_after is not None else None,
        "steps": trainer.state.global_step,
        "train_tokens_seen": trainer.state.num_input_tokens_seen,
        "train_runtime_s": round(elapsed, 2),
        "tokens_per_second": round(trainer.state.num_input_tokens_seen / max(elapsed, 1e-9), 1),
    }
    meta = build_meta(recipe, ref, config, tokenizer, targets, trainable, data, plan, packing, metrics)
    meta["base_model"]["fingerprint"] = key["base_fingerprint"]
    meta["data"]["content_hash"] = key["data_content"]
    path = plan_save(trainer, recipe, meta, overwrite)
    if trainer.is_world_process_zero():
        for ckpt in runs.checkpoints(run_dir, complete_only=False):
            shutil.rmtree(ckpt, ignore_errors=True)
    return TrainResult(recipe.adapter_name, path, metrics, meta)


def build_meta(recipe, ref, config, tokenizer, targets, trainable, data, plan, packing, metrics) -> dict[str, Any]:
    """lorakit.json: everything needed to use, reproduce and check this adapter."""
    return {
        "name": recipe.adapter_name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": method_name(recipe),
        "recipe": recipe.model_dump(mode="json"),
        "base_model": {
            "reference": recipe.base_model.name,
            "kind": ref.kind,
            "path": ref.path,
            "gguf_file": ref.gguf_file,
            "architecture": (config.architectures or [config.model_type])[0],
            "quantization": recipe.base_model.quantization,
        },
        "tokenizer": {
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "chat_template": tokenizer.chat_template,
            "prompt_style": prompt_style(tokenizer, {s.format for s in recipe.data.sources}),
        },
        "target_modules": targets if isinstance(targets, list) else [targets],
        "lora_alpha": recipe.lora.alpha if recipe.lora.alpha is not None else 2 * recipe.lora.r,
        "trainable_params": trainable,
        "data": dict(data.report),
        "plan": {
            "device": str(plan.device),
            "precision": plan.precision,
            "packing": packing,
            "gradient_checkpointing": plan.gradient_checkpointing,
        },
        "metrics": metrics,
        "seed": recipe.train.seed,
        "recipe_hash": "sha256:"
        + hashlib.sha256(recipe.model_dump_json(exclude={"output": {"store", "runs_dir"}}).encode()).hexdigest(),
        "versions": versions(),
    }


def plan_save(trainer, recipe: Recipe, meta: dict, overwrite: bool) -> Path:
    """The main process writes the adapter; the others return once it is in place.

    FSDP and DeepSpeed shard the weights: every process takes part in gathering them first.
    """
    store = Path(recipe.output.store)
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if sharded else None
    path = adapters.adapter_dir(store, recipe.adapter_name)
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        path = adapters.save_adapter(model, store, recipe.adapter_name, meta, overwrite, state_dict=state_dict)
    trainer.accelerator.wait_for_everyone()
    return path


def _data_summary(data: Prepared) -> str:
    r = data.report
    parts = [
        f"{Path(s['path']).name} ({s['format']}, {s['documents']} docs, {s['share']:.0%} of training tokens)"
        for s in r["sources"]
    ]
    return (
        f"data: {data.origin()}; {r['train_tokens']:,} training tokens in {r['train_examples']} examples, "
        f"{r['eval_tokens']:,} eval tokens; mix: " + ", ".join(parts)
    )
