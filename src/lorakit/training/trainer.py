"""TRL's SFTTrainer as lorakit runs it, and the recipe's mapping to `LoraConfig` and `SFTConfig`."""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit import internals
from lorakit.plan import Plan
from lorakit.recipe import Recipe
from lorakit.training import attention, runtime
from lorakit.training.loss import LastHidden, chunked_lm_loss, chunked_loss_parts


def sft_trainer_class():
    """SFTTrainer with the model's own loss, computed in chunks, instead of TRL's fused, chunked LM head.

    TRL computes log-probs, entropy and top-1 accuracy in vocabulary tiles for its logged metrics; on the CPU
    that halves training speed (measured: 135 vs 228 tokens/s on SmolLM2-135M). lorakit runs the decoder body,
    then the head and the cross-entropy over chunks of supervised tokens (`chunked_lm_loss`): the same loss and
    gradients as the model's own, without the [tokens, vocabulary] logits and their gradient in memory.
    """
    from trl import SFTTrainer

    plain_loss = internals.trainer_compute_loss()

    class LorakitSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled  # the head's weight is not whole there
            self.chunked_head = None if sharded else chunked_loss_parts(self.model)
            if not sharded:  # FSDP/DeepSpeed flatten parameters by dtype: leave TRL's choice there
                runtime.adapter_in_float32(self.model)
            if self.args.bf16 or self.args.fp16:
                internals.keep_lora_inputs_as_they_come(self.model)
                internals.quantized_outputs_in_compute_dtype(self.model)
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
                return plain_loss(self, model, inputs, return_outputs, num_items_in_batch)
            body, head = self.chunked_head
            with LastHidden(body) as seen:
                # The head runs on one position only: the loss is computed from the body's output below.
                model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=1)
            # Like Trainer.compute_loss: the model divides by num_items_in_batch only when it accepts loss kwargs.
            items = internals.items_for_model_loss(self, num_items_in_batch)
            loss = chunked_lm_loss(seen.hidden, inputs["labels"], head, seen.dtype or head.weight.dtype, items)
            if self.args.average_tokens_across_devices and items is not None:
                loss = loss * internals.loss_scale_across_devices(self)
            return loss

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            if self.args.device.type == "cpu":
                runtime.release_freed_memory()
            return loss

    return LorakitSFTTrainer


def build_lora_config(recipe: Recipe, plan: Plan):
    from peft import LoraConfig

    lora = recipe.lora
    targets = plan.target_modules
    return LoraConfig(
        r=lora.r,
        lora_alpha=plan.lora_alpha,
        lora_dropout=lora.dropout,
        target_modules=targets[0] if targets == ("all-linear",) else list(targets),
        bias=lora.bias,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        modules_to_save=lora.modules_to_save or None,
        fan_in_fan_out=plan.fan_in_fan_out,
        task_type="CAUSAL_LM",
    )


def build_sft_config(recipe: Recipe, out_dir: Path, plan: Plan, has_eval: bool, eval_first: bool = False):
    """The recipe and its Plan as TRL's `SFTConfig` (the step count is the trainer's own: the Plan predicts it)."""
    from trl import SFTConfig

    t = recipe.train
    return SFTConfig(
        output_dir=str(out_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=plan.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        activation_checkpointing=plan.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
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
        report_to=list(t.report_to) or "none",
        disable_tqdm=True,
        max_length=recipe.data.block_size,
        packing=plan.packing == "padding-free",
        packing_strategy="bfd",
        shuffle_dataset=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        use_cpu=not plan.on_gpu,
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
