"""Every place lorakit touches a private or undocumented part of a library, each behind a guard.

Each function says why lorakit needs it, and checks that what it touches is still there as expected: if an
upgrade changed it, the guard raises a `LorakitError` naming the library and its installed version instead of
letting training run silently wrong. tests/test_internals.py holds one canary per function, so an upgrade fails
there first. Where a public API does the job, lorakit uses it instead and nothing belongs here.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from importlib import metadata

from lorakit.errors import LorakitError


def installed(lib: str) -> str:
    """The installed version of `lib` ("python" for the interpreter)."""
    if lib == "python":
        return sys.version.split()[0]
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def guard(ok: bool, lib: str, what: str) -> None:
    """Raise if a library no longer has what lorakit relies on."""
    if not ok:
        raise LorakitError(f"{lib} {installed(lib)} no longer has {what}: lorakit needs an update")


def parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


# --- transformers and trl: the training loss ---------------------------------------------------------------------

TRAINER_LOSS_PARAMETERS = ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]


def trainer_compute_loss():
    """transformers' `Trainer.compute_loss`, which lorakit's trainer calls past TRL's `SFTTrainer.compute_loss`.

    TRL's own compute_loss adds token-accuracy and entropy metrics computed over the whole vocabulary for every
    batch: on the CPU that halves training speed. lorakit's trainer falls back to the plain Trainer loss for the
    cases its chunked loss does not cover, so the guard checks that there is a TRL method to skip and that
    Trainer's still takes the arguments lorakit passes."""
    from transformers import Trainer
    from trl import SFTTrainer

    guard("compute_loss" in vars(SFTTrainer), "trl", "SFTTrainer.compute_loss")
    guard(
        parameters(Trainer.compute_loss)[:5] == TRAINER_LOSS_PARAMETERS,
        "transformers",
        f"Trainer.compute_loss({', '.join(TRAINER_LOSS_PARAMETERS[1:])})",
    )
    return Trainer.compute_loss


def items_for_model_loss(trainer, num_items_in_batch):
    """The token count the model's loss divides by: as Trainer.compute_loss passes it, only to a model that
    accepts loss kwargs (`model_accepts_loss_kwargs`, set by Trainer.__init__), else None (a plain mean)."""
    guard(hasattr(trainer, "model_accepts_loss_kwargs"), "transformers", "Trainer.model_accepts_loss_kwargs")
    return num_items_in_batch if trainer.model_accepts_loss_kwargs else None


def loss_scale_across_devices(trainer) -> int:
    """The factor Trainer.compute_loss multiplies a loss by when tokens are averaged across devices: the number
    of processes holding distinct batches (tensor-parallel ranks share theirs: `get_tp_size`)."""
    guard(callable(getattr(trainer, "get_tp_size", None)), "transformers", "Trainer.get_tp_size")
    return trainer.accelerator.num_processes // trainer.get_tp_size()


def uses_causal_lm_loss(model) -> bool:
    """Is the model's loss transformers' standard causal-LM loss (`ForCausalLMLoss`)?

    lorakit's chunked loss reproduces that loss and no other; transformers exposes which loss a model uses only
    as the function itself, kept in `transformers.loss.loss_utils`."""
    from transformers.loss import loss_utils

    guard(callable(getattr(loss_utils, "ForCausalLMLoss", None)), "transformers", "loss.loss_utils.ForCausalLMLoss")
    return getattr(model, "loss_function", None) is loss_utils.ForCausalLMLoss


def attn_implementation(config) -> str | None:
    """The attention a model's config is set to (`config._attn_implementation`: transformers has no public
    reader; `set_attn_implementation` is the public writer)."""
    from transformers import PretrainedConfig

    guard(
        isinstance(inspect.getattr_static(PretrainedConfig, "_attn_implementation", None), property),
        "transformers",
        "PretrainedConfig._attn_implementation",
    )
    return getattr(config, "_attn_implementation", None)


# --- peft and bitsandbytes: dtypes under autocast ------------------------------------------------------------------


def keep_lora_inputs_as_they_come(model) -> int:
    """Stop peft from casting each LoRA layer's input to the adapter's dtype (fp32) when training under autocast.

    Autocast casts a matmul's inputs to the compute dtype anyway, so peft's cast is a copy of the activations
    made only to be cast back: two copies per LoRA layer and step, and their gradients' on the way back.
    peft's public switch is `peft.helpers.disable_input_dtype_casting`, a context manager that sets each layer's
    `cast_input_dtype_enabled` and restores it on exit; lorakit needs it off for the trainer's whole life
    (including the forwards gradient checkpointing recomputes during backward), so it sets the same attribute.
    Returns the number of layers changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    source = inspect.getsource(BaseTunerLayer._cast_input_dtype) if hasattr(BaseTunerLayer, "_cast_input_dtype") else ""
    guard("cast_input_dtype_enabled" in source, "peft", "BaseTunerLayer.cast_input_dtype_enabled")
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return len(layers)


def _input_in_compute_dtype(module, args):
    import torch  # lorakit.internals is imported by the CLI, which must start without torch

    x = args[0]
    wanted = module.compute_dtype
    if wanted is not None and x.dtype != wanted and x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return (x.to(wanted), *args[1:])
    return None


def _linear4bit_layers(model, attribute: str) -> list:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    guard(all(hasattr(m, attribute) for m in layers), "bitsandbytes", f"Linear4bit.{attribute}")
    return layers


def quantized_outputs_in_compute_dtype(model) -> int:
    """Under autocast, hand bitsandbytes' 4-bit layers their input in the compute dtype, so they answer in it.

    A `Linear4bit` casts its input to its compute dtype (bf16) for the matmul, and its output back to the
    input's dtype. For k-bit training the norms before the projections are kept in float32, so every
    projection answered in float32, and the LoRA sums, the MLP's activation and product and the rotary
    embedding ran in float32 where autocast runs them in bf16 after a plain `Linear`. With the cast made first
    (the cast the layer makes anyway, to its `compute_dtype` attribute) a 4-bit layer behaves as autocast makes a
    `Linear` behave, and a QLoRA step does the same elementwise work in the same dtype as a LoRA step. Outside
    autocast nothing changes. Returns the number of layers hooked."""
    layers = _linear4bit_layers(model, "compute_dtype")
    for m in layers:
        m.register_forward_pre_hook(_input_in_compute_dtype)
    return len(layers)


def keep_4bit_trainable_on_cpu(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    bitsandbytes 0.50 repacks a Linear4bit's weights on the first no-grad forward in eval mode on
    a CPU with AVX512-BF16 (an evaluation, say); the kernel it then uses for every later forward,
    training included, has no backward, so gradients through the base are silently wrong
    (measured: a QLoRA run that evaluated first learned about a tenth as much). The layer's
    `support_avx512bf16_for_cpu` flag, set from the CPU at construction, is the only switch.
    Returns the number of layers changed.
    """
    layers = _linear4bit_layers(model, "support_avx512bf16_for_cpu")
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


# --- peft without bitsandbytes -------------------------------------------------------------------------------------

BNB_ANSWERS = ("is_bnb_available", "is_bnb_4bit_available")


@contextlib.contextmanager
def without_bitsandbytes(quantized: bool):
    """Import and use peft for a full-precision base without importing bitsandbytes.

    peft imports bitsandbytes whenever it is installed (at import, and again when it wraps layers),
    and bitsandbytes imports torch's compiler: about 1 s of a generation's start-up, for nothing when
    the base is not quantized. When the base is not quantized and bitsandbytes is not imported yet in
    this process, it is hidden for the duration (`sys.modules[name] = None`: an import of it fails,
    find_spec says it is absent; peft then registers no 4/8-bit layers), and peft's cached answers are
    forgotten afterwards, so a quantized model loaded later in the same process still gets them."""
    if quantized or "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None
    forget_bnb_answers()
    try:
        yield
    finally:
        del sys.modules["bitsandbytes"]
        forget_bnb_answers()


def forget_bnb_answers() -> None:
    """Clear peft's cached "is bitsandbytes available" answers (`functools.cache`d in `peft.import_utils`)."""
    utils = sys.modules.get("peft.import_utils")
    if utils is None:  # not imported yet: nothing cached
        return
    for name in BNB_ANSWERS:
        answer = getattr(utils, name, None)
        guard(callable(getattr(answer, "cache_clear", None)), "peft", f"a cached import_utils.{name}")
        answer.cache_clear()


# --- the interpreter -----------------------------------------------------------------------------------------------


def run_exit_handlers() -> None:
    """Run the `atexit` handlers now, as the interpreter would at exit (`atexit._run_exitfuncs`).

    `lorakit` ends its process with `os._exit` once a verb is done, skipping an orderly interpreter shutdown
    that takes about a second with torch imported; the handlers registered by libraries (logging, temporary
    folders, worker processes) must still run first, and Python offers no public call for that."""
    import atexit

    guard(callable(getattr(atexit, "_run_exitfuncs", None)), "python", "atexit._run_exitfuncs")
    atexit._run_exitfuncs()


# --- torch: tensor storage identity on the meta device -------------------------------------------------------------


def storage_key(t) -> int:
    """An identity for the storage behind tensor `t`, shared by its views, on any device.

    `lorakit plan` counts each tensor autograd saves once, however many views of it are saved. `data_ptr()` is the
    public identity, but every meta tensor's is 0; the storage's C++ handle (`_cdata`) is the one identity meta
    storages have. Stable while the storage lives (plan keeps saved tensors alive while it counts)."""
    st = t.untyped_storage()
    key = getattr(st, "_cdata", None)
    guard(isinstance(key, int), "torch", "UntypedStorage._cdata (a storage's handle, used to count meta tensors)")
    return key
