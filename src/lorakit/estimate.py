"""How much memory a training run needs, from the model's configuration alone (`lorakit plan`, and `lorakit train`'s
warning before it loads anything).

The model is built on the meta device (no weights read, no memory), LoRA attached by peft as training attaches it,
and one forward pass runs there on the recipe's micro-batch shape with autograd's saved-tensor hooks counting every
tensor kept for the backward pass, by the decoder layer that kept it. The attention itself runs through a meter
(registered with transformers' attention interface) that keeps what the implementation in use keeps: q, k, v, the
output and the softmax statistics for flash-style kernels (sdpa, FlashAttention 2, lorakit's per-document sdpa), the
full attention matrix for eager attention. What the forward pass cannot show is added from the code it runs:

- the loss: lorakit's chunked loss keeps the gradient of the final hidden states and one chunk of logits; the model's
  own loss materialises the logits, their fp32 copy, the log-softmax kept for backward and its gradient;
- quantized weights as bitsandbytes stores them (NF4/FP4: half a byte per weight plus its absmax, 8-bit when doubly
  quantized; LLM.int8: a byte per weight plus a row scale), LoRA weights in fp32 as peft keeps them, their gradients
  and the optimizer's states;
- during backward, the gradients of one layer's activations next to what is still saved (WORKING_LAYERS);
- on a GPU, the CUDA context and the caching allocator's slack (named below, not measured here).

The peak is the worst phase (loading; forward and backward; the optimizer step), not a sum of everything.
bench/plan_accuracy.py measures the estimate against PyTorch's own allocator accounting on this CPU."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

GiB = 1 << 30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# On a GPU, besides tensors: the CUDA context with cuBLAS/cuDNN loaded (300-600 MB with torch 2.x on recent cards;
# the upper end is assumed) and the caching allocator's blocks reserved but not allocated (fragmentation), taken as
# a share of what is allocated and freed during a step.
CUDA_CONTEXT = 600 << 20
ALLOCATOR_SLACK = 0.10
# Backward holds the gradients of the activations of the layer it is in while that layer's saved tensors are still
# there: calibrated on this CPU (bench/plan_accuracy.py).
WORKING_LAYERS = 1.0
# bitsandbytes' block size for 4-bit absmax, and for the second-level (double) quantization of those absmax.
NF4_BLOCK, DOUBLE_QUANT_BLOCK = 64, 256
# bytes per trainable parameter the optimizer keeps (AdamW: two fp32 moments; bitsandbytes 8-bit: two uint8 moments
# and their block scales; SGD without momentum: nothing)
OPTIMIZER_BYTES = {
    "adamw_torch": 8.0,
    "adamw_torch_fused": 8.0,
    "adamw_8bit": 2.0 + 8 / 2048,
    "paged_adamw_8bit": 2.0 + 8 / 2048,
    "sgd": 0.0,
}
METER = "lorakit_meter"


@dataclass
class Shape:
    """One micro-batch: `rows` sequences of `length` tokens (padding-free packing: one row of rows x length)."""

    rows: int
    length: int

    @property
    def tokens(self) -> int:
        return self.rows * self.length


@dataclass
class Trace:
    """What one traced forward pass kept for backward, in bytes."""

    shape: Shape
    per_layer: list[int]  # kept by each decoder layer (attention included)
    layer_inputs: list[int]  # each layer's input hidden states: what checkpointing keeps instead
    outside: int  # kept outside the layers (embeddings, final norm)
    attention_quadratic: int  # of per_layer: the part growing with length squared (eager attention's matrix)

    def scaled(self, shape: Shape) -> Trace:
        """The same model at another micro-batch shape: linear in tokens, the attention matrix in length squared."""
        lin = shape.tokens / self.shape.tokens
        quad = shape.rows * shape.length**2 / (self.shape.rows * self.shape.length**2)
        q = self.attention_quadratic / max(len(self.per_layer), 1)
        return Trace(
            shape,
            [round((b - q) * lin + q * quad) for b in self.per_layer],
            [round(b * lin) for b in self.layer_inputs],
            round(self.outside * lin),
            round(self.attention_quadratic * quad),
        )


@dataclass
class Memory:
    """A training run's memory on one device, in bytes."""

    device: str
    weights: int
    lora: int
    gradients: int
    optimizer: int
    activations: int  # kept for backward, with the run's checkpointing setting
    activations_other: int  # with the other setting (for the advice)
    working: int  # the gradients of one layer's activations during backward
    loss: int  # the loss path the run uses
    loss_other: int  # the other loss path (chunked vs the model's own full logits)
    loss_path: str  # "chunked" or "full logits"
    cuda_context: int = 0
    allocator_slack: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    peak_phase: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Settings:
    """The choices the estimate depends on, as the Plan resolved them (and as the advice varies them)."""

    rows: int  # micro-batch: sequences per step on the device
    length: int  # tokens per sequence (block_size)
    gradient_checkpointing: bool
    quantization: str  # none, 4bit, 8bit
    double_quant: bool
    weights_dtype: str
    compute_dtype: str  # of activations
    optimizer: str
    chunked_loss: bool
    cuda: bool
    attention: str  # "flash" (sdpa, FlashAttention 2, per-document sdpa) or "eager"

    def replace(self, **changes) -> Settings:
        return Settings(**{**asdict(self), **changes})


# --- the meta model -------------------------------------------------------------------------


def register_meter() -> None:
    """The meter attention: keeps (on the meta device) what the attention implementation being modelled keeps."""
    import torch
    from transformers import AttentionInterface

    class _Kept(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, eager):
            b, h, n, d = q.shape
            out = torch.empty((b, n, h, d), dtype=q.dtype, device=q.device)
            lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
            kept = [q, k, v, out, lse]
            if eager:  # the softmax in fp32 (kept for its backward) and, in a narrower dtype, its cast for @ v
                weights = torch.empty((b, h, n, n), dtype=torch.float32, device=q.device)
                kept.append(weights)
                if q.dtype != torch.float32:
                    kept.append(torch.empty((b, h, n, n), dtype=q.dtype, device=q.device))
                rep = h // k.shape[1]
                if rep > 1:  # eager repeats k and v to every query head
                    kept += [k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)]
            ctx.save_for_backward(*kept)
            return out

        @staticmethod
        def backward(ctx, grad):  # never run: the meta model is only traced forward
            raise NotImplementedError

    def meter(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        eager = getattr(module.config, "_lorakit_eager", False)
        return _Kept.apply(query, key, value, eager), None

    AttentionInterface.register(METER, meter)  # public; registering again replaces the same function


def meta_model(config, settings: Settings, lora_config, trust_remote_code: bool = False):
    """The model with LoRA attached, on the meta device, in the dtype its activations take; (model, how it was
    built): with the meter attention where the model takes it, else with its own attention."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    register_meter()
    dtype = getattr(torch, settings.compute_dtype if settings.quantization != "none" else settings.weights_dtype)
    config = config.__class__.from_dict(config.to_dict())  # a copy: the meter flag stays on it
    config._lorakit_eager = settings.attention == "eager"
    config.use_cache = False
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=METER, trust_remote_code=trust_remote_code
            )
            how = "meter"
        except (ValueError, TypeError, NotImplementedError):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
            how = "own attention"
        model = get_peft_model(model, lora_config)
    return model, how


def decoder_layers(model, config) -> list:
    """The repeated decoder blocks: the module list as long as the config's layer count."""
    import torch

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n and n]
    if not lists:
        raise ValueError("no list of decoder layers as long as num_hidden_layers")
    return list(lists[0])


def trace(model, config, shape: Shape, packed: bool, autocast16: bool = False) -> Trace:
    """Run one forward pass on the meta device and count what autograd keeps for backward, by layer.

    `autocast16`: the run trains in bf16/fp16 mixed precision. peft keeps LoRA weights in fp32 and casts each
    LoRA layer's input to fp32; under autocast the matmul then keeps a 16-bit copy of it, not the fp32 one the meta
    device (which has no autocast) shows: those are counted at 2 bytes an element."""
    import torch

    from lorakit.internals import storage_key

    params = {storage_key(p) for p in model.parameters()} | {storage_key(b) for b in model.buffers()}
    layers = decoder_layers(model, config)
    per_layer = [0] * len(layers)
    inputs = [0] * len(layers)
    seen: set[int] = set()
    alive: list = []  # kept tensors stay referenced: their storages' addresses are not reused while counting
    where = [-1]
    outside = [0]

    lora_inputs: set[int] = set()

    def lora_input(module, args):
        if args and torch.is_tensor(args[0]):
            lora_inputs.add(storage_key(args[0]))

    def pack(t):
        key = storage_key(t)
        if key not in params and key not in seen:
            seen.add(key)
            alive.append(t)
            n = t.untyped_storage().nbytes()
            if autocast16 and t.dtype == torch.float32 and key in lora_inputs:
                n //= 2
            if where[0] >= 0:
                per_layer[where[0]] += n
            else:
                outside[0] += n
        return t

    def enter(i):
        def hook(module, args, kwargs):
            where[0] = i
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is not None:
                inputs[i] = hidden.untyped_storage().nbytes()

        return hook

    def leave(module, args, output):
        where[0] = -1

    handles = [layer.register_forward_pre_hook(enter(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(leave) for layer in layers]
    handles += [
        m.register_forward_pre_hook(lora_input)
        for name, m in model.named_modules()
        if ".lora_A." in f"{name}." and isinstance(m, torch.nn.Linear)
    ]
    rows, length = (1, shape.tokens) if packed else (shape.rows, shape.length)
    ids = torch.zeros((rows, length), dtype=torch.long, device="meta")
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if packed:  # padding-free packing: one row, positions restarting at every sequence
        kwargs["position_ids"] = torch.zeros((1, length), dtype=torch.long, device="meta")
    try:
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            try:
                model(**kwargs, logits_to_keep=1)
            except TypeError:
                model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    quadratic = 0
    if getattr(model.config, "_lorakit_eager", False):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        b = BYTES.get(str(next(model.parameters()).dtype).removeprefix("torch."), 4)
        per_seq = text.num_attention_heads * shape.length**2 * (4 + (b if b != 4 else 0))
        quadratic = len(layers) * shape.rows * per_seq
    return Trace(shape, per_layer, inputs, outside[0], quadratic)


# --- the parts --------------------------------------------------------------------------------


def weight_bytes(model, settings: Settings, only_quantized: bool = False) -> int:
    """The frozen base weights as stored: quantized linear layers of the blocks, the rest in the weights' dtype
    (`only_quantized`: the quantized ones alone)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    plain = BYTES[settings.weights_dtype if settings.quantization == "none" else settings.compute_dtype]
    total, seen = 0, set()
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or "lora_" in name or p.requires_grad:
                continue
            seen.add(id(p))
            quantized = (
                settings.quantization != "none"
                and isinstance(module, torch.nn.Linear)
                and pname == "weight"
                and id(p) not in head_ids
            )
            if not quantized:
                total += 0 if only_quantized else p.numel() * plain
            elif settings.quantization == "4bit":
                blocks = math.ceil(p.numel() / NF4_BLOCK)
                absmax = blocks * (1 + 4 / DOUBLE_QUANT_BLOCK) if settings.double_quant else blocks * 4
                total += math.ceil(p.numel() / 2) + int(absmax)
            else:  # LLM.int8: int8 weights and one fp32 scale per output row
                total += p.numel() + 4 * p.shape[0]
    return total


def loss_bytes(tokens: int, hidden: int, vocab: int, b: int, chunked: bool) -> int:
    """The loss's own memory at its worst, for `tokens` supervised tokens."""
    if chunked:  # the gradient of the hidden states (kept for backward), the gathered hidden states, one chunk
        rows = min(tokens, max(1, (1 << 23) // vocab))
        chunk = rows * vocab * (b + (4 if b != 4 else 0) + 4 + b) + 2 * rows * hidden * b
        return 2 * tokens * hidden * b + chunk
    # the logits, their fp32 copy, the log-softmax kept for backward, then its gradient
    return tokens * vocab * (b + (4 if b != 4 else 0) + 4 + 4)


@dataclass
class Sizes:
    """The base model's weights: from the meta model, or extrapolated from one- and two-layer copies (`layers` of
    them in the model) when every layer is the same."""

    models: list
    layers: int

    def weights(self, settings: Settings, only_quantized: bool = False) -> int:
        if len(self.models) == 1:
            return weight_bytes(self.models[0], settings, only_quantized)
        one, two = (weight_bytes(m, settings, only_quantized) for m in self.models)
        return one + (self.layers - 1) * (two - one)

    @property
    def largest(self) -> int:
        return max((p.numel() for p in self.models[-1].parameters()), default=0)


def loading_bytes(sizes: Sizes, settings: Settings, weights: int) -> int:
    """The peak while the base loads. Unquantized: its weights. Quantized on a GPU: the quantized weights and one
    weight in full precision on its way to be quantized. Quantized on the CPU, transformers holds every weight in
    full precision next to the quantized ones, and a run held one embedding-sized copy more at that point (measured
    on SmolLM2-135M, fp32 weights 513 MiB: loading alone peaked at 573 MiB in 4-bit and 622 MiB in 8-bit, a whole
    run at 674 and 723)."""
    if settings.quantization == "none":
        return weights
    plain = BYTES[settings.compute_dtype]
    largest = sizes.largest * plain
    if settings.cuda:
        return weights + largest
    full = sizes.weights(settings.replace(quantization="none", weights_dtype=settings.compute_dtype))
    return full + sizes.weights(settings, only_quantized=True) + largest


def memory(trace_: Trace, sizes: Sizes, config, settings: Settings, trainable: int) -> Memory:
    """The memory of a run with `settings`, its activations from `trace_` (scaled to the settings' shape)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    t = trace_.scaled(Shape(settings.rows, settings.length))
    b = BYTES[settings.compute_dtype if settings.quantization != "none" else settings.weights_dtype]
    full = sum(t.per_layer) + t.outside
    checkpointed = sum(t.layer_inputs) + t.outside + max(t.per_layer, default=0)
    acts, other = (checkpointed, full) if settings.gradient_checkpointing else (full, checkpointed)
    layer = max(t.per_layer, default=0)
    # Without checkpointing, backward starts with everything saved, the loss's gradient and the last layer's
    # activation gradients. With it, the layers' inputs stay; the loss runs before any layer is recomputed, and a
    # recomputed layer's tensors are freed as its backward uses them: the worse of the two, not their sum
    # (measured on this CPU: bench/plan_accuracy.py).
    working = 0 if settings.gradient_checkpointing else round(WORKING_LAYERS * layer)
    vocab, hidden = int(text.vocab_size), int(text.hidden_size)
    loss = loss_bytes(t.shape.tokens, hidden, vocab, b, settings.chunked_loss)
    loss_other = loss_bytes(t.shape.tokens, hidden, vocab, b, not settings.chunked_loss)
    weights = sizes.weights(settings)
    lora = trainable * 4
    grads = trainable * 4
    opt = round(trainable * OPTIMIZER_BYTES.get(settings.optimizer, 8.0))
    m = Memory(
        "cuda" if settings.cuda else "cpu",
        weights,
        lora,
        grads,
        opt,
        acts,
        other,
        working,
        loss,
        loss_other,
        "chunked" if settings.chunked_loss else "full logits",
    )
    static = weights + lora + grads + opt
    step = acts - layer + max(loss, layer) if settings.gradient_checkpointing else acts + working + loss
    if settings.cuda:
        m.cuda_context = CUDA_CONTEXT
        m.allocator_slack = round(ALLOCATOR_SLACK * step)
    extra = m.cuda_context + m.allocator_slack
    m.phases = {
        "loading": loading_bytes(sizes, settings, weights) + m.cuda_context,
        "forward and backward": static + step + extra,
        "optimizer step": static + 3 * trainable * 4 + m.cuda_context,  # AdamW's temporaries
    }
    m.peak_phase = max(m.phases, key=m.phases.get)
    m.peak = m.phases[m.peak_phase]
    return m


# --- GPUs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSpec:
    key: str
    name: str
    memory: int  # bytes
    bf16: bool


_GPUS = [
    ("rtx3060", "GeForce RTX 3060 12 GB", 12, True),
    ("rtx3080", "GeForce RTX 3080 10 GB", 10, True),
    ("rtx3090", "GeForce RTX 3090 24 GB", 24, True),
    ("rtx4060", "GeForce RTX 4060 8 GB", 8, True),
    ("rtx4060ti", "GeForce RTX 4060 Ti 16 GB", 16, True),
    ("rtx4070", "GeForce RTX 4070 12 GB", 12, True),
    ("rtx4080", "GeForce RTX 4080 16 GB", 16, True),
    ("rtx4090", "GeForce RTX 4090 24 GB", 24, True),
    ("rtx5090", "GeForce RTX 5090 32 GB", 32, True),
    ("t4", "Tesla T4 16 GB", 16, False),
    ("v100", "Tesla V100 16 GB", 16, False),
    ("v100-32gb", "Tesla V100 32 GB", 32, False),
    ("a10", "A10 24 GB", 24, True),
    ("l4", "L4 24 GB", 24, True),
    ("a100-40gb", "A100 40 GB", 40, True),
    ("a100-80gb", "A100 80 GB", 80, True),
    ("a6000", "RTX A6000 48 GB", 48, True),
    ("l40s", "L40S 48 GB", 48, True),
    ("h100", "H100 80 GB", 80, True),
    ("h100-80gb", "H100 80 GB", 80, True),
]
GPUS = {key: GpuSpec(key, name, gib * GiB, bf16) for key, name, gib, bf16 in _GPUS}
VERDICT_SIZES = (8, 12, 16, 24, 40, 48, 80)


def gpu_spec(text: str) -> GpuSpec:
    """`--gpu`: a card's name (rtx4090, a100-80gb, ...) or a size (24GB, 24 GiB, 12)."""
    from lorakit.errors import LorakitError

    key = text.strip().lower().replace(" ", "").replace("_", "-")
    if key in GPUS:
        return GPUS[key]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(gb|gib|g)?", key)
    if m:
        gib = float(m[1])
        if 0 < gib <= 4096:
            return GpuSpec(f"{gib:g}gb", f"a {gib:g} GB GPU", int(gib * GiB), True)
    raise LorakitError(f"--gpu {text!r}: give a size (24GB) or one of {', '.join(sorted(GPUS))}")


# --- a recipe's estimate ----------------------------------------------------------------------------


@dataclass
class Estimate:
    trainable: int
    total: int
    memory: Memory
    traced: str  # "meter": traced with the meter attention; "own attention"; "parameters only" (not traced)
    note: str = ""


def settings_of(recipe, plan) -> Settings:
    """The estimate's inputs, as the Plan resolved them."""
    return Settings(
        rows=recipe.train.batch_size,
        length=recipe.data.block_size,
        gradient_checkpointing=plan.gradient_checkpointing,
        quantization=plan.quantization,
        double_quant=plan.double_quant,
        weights_dtype=plan.weights_dtype,
        compute_dtype=plan.compute_dtype if plan.quantization != "none" else plan.weights_dtype,
        optimizer=recipe.train.optimizer,
        chunked_loss=True,
        cuda=plan.on_gpu,
        attention="eager" if plan.attn_implementation == "eager" else "flash",
    )


def estimate(recipe, plan, config) -> tuple[Estimate, Sizes, Trace | None]:
    """The run's parameter counts and memory on the Plan's device; (estimate, sizes, trace). A model whose layers
    are all alike is built with one and with two layers and the rest extrapolated (seconds for a 70B model);
    others are built whole. An architecture the meta device cannot run gets its weights, LoRA and optimizer only,
    labelled as such."""
    import copy

    import torch

    from lorakit.models.architecture import layer_count, repeated_layers, with_layers
    from lorakit.training.trainer import build_lora_config

    settings = settings_of(recipe, plan)
    lora = build_lora_config(recipe, plan)
    n = layer_count(config)
    configs = [with_layers(config, 1), with_layers(config, 2)] if repeated_layers(config) else [config]
    built = [meta_model(c, settings, copy.deepcopy(lora), recipe.base_model.trust_remote_code) for c in configs]
    models, how = [m for m, _ in built], built[-1][1]
    counts = [m.get_nb_trainable_parameters() for m in models]
    if len(models) == 2:
        (t1, p1), (t2, p2) = counts
        trainable, total = t1 + (n - 1) * (t2 - t1), p1 + (n - 1) * (p2 - p1)
    else:
        trainable, total = counts[0]
    head = models[-1].get_output_embeddings()
    settings.chunked_loss = type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())
    packed = plan.packing == "padding-free"
    note = ""
    shape = Shape(settings.rows, settings.length)
    try:
        autocast16 = BYTES[settings.compute_dtype] == 2
        t = trace(models[-1], configs[-1], shape, packed, autocast16)
        if len(models) == 2:  # the second layer stands for every layer after the first
            t = Trace(shape, [t.per_layer[0]] + [t.per_layer[1]] * (n - 1),
                      [t.layer_inputs[0]] + [t.layer_inputs[1]] * (n - 1), t.outside,
                      t.attention_quadratic // 2 * n)  # fmt: skip
    except Exception as e:  # any model code that does not run on the meta device: parameters only
        t = None
        note = f"activations not estimated: the model does not run on the meta device ({type(e).__name__})"
        how = "parameters only"
    sizes = Sizes(models, n)
    mem = memory(t or Trace(shape, [0], [0], 0, 0), sizes, config, settings, trainable)
    return Estimate(trainable, total, mem, how, note), sizes, t
