"""Canaries for lorakit.internals: each asserts that what lorakit touches inside a library is still there and
still behaves as lorakit relies on, so a library upgrade fails here, by name, before it fails a training run."""

from __future__ import annotations

import inspect
import subprocess
import sys
from importlib import metadata

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit import internals
from lorakit.errors import LorakitError


def test_a_failed_guard_names_the_library_its_version_and_what_is_missing():
    with pytest.raises(LorakitError) as exc:
        internals.guard(False, "transformers", "Trainer.X")
    version = metadata.version("transformers")
    assert str(exc.value) == f"transformers {version} no longer has Trainer.X: lorakit needs an update"
    assert internals.installed("python") == sys.version.split()[0]
    assert internals.installed("no-such-library-here") == "(not installed)"


# --- transformers and trl: the training loss ---------------------------------------------------------------------


def test_trainer_compute_loss_is_there_to_call_past_trls():
    from transformers import Trainer
    from trl import SFTTrainer

    assert internals.trainer_compute_loss() is Trainer.compute_loss
    assert SFTTrainer.compute_loss is not Trainer.compute_loss  # TRL's own, the one skipped
    assert internals.parameters(Trainer.compute_loss)[:5] == internals.TRAINER_LOSS_PARAMETERS


def test_trainer_compute_loss_guard_fires_when_trl_drops_its_method(monkeypatch):
    from trl import SFTTrainer

    monkeypatch.delattr(SFTTrainer, "compute_loss")
    with pytest.raises(LorakitError, match=r"^trl \S+ no longer has SFTTrainer.compute_loss"):
        internals.trainer_compute_loss()


@pytest.fixture(scope="module")
def plain_trainer(tiny_llama, tmp_path_factory):
    from transformers import Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("t")), use_cpu=True, report_to="none")
    return Trainer(model=model, args=args)


def test_trainer_sets_what_lorakits_loss_mirrors(plain_trainer):
    """Trainer.compute_loss passes the token count only to a model that accepts loss kwargs, and scales an
    across-devices average by `num_processes // get_tp_size()`: lorakit's chunked loss does the same."""
    from transformers import Trainer

    assert plain_trainer.model_accepts_loss_kwargs is True  # Llama's forward takes **kwargs for the loss
    assert internals.items_for_model_loss(plain_trainer, 17) == 17
    assert plain_trainer.get_tp_size() == 1 and internals.loss_scale_across_devices(plain_trainer) == 1
    source = inspect.getsource(Trainer.compute_loss)
    assert "if self.model_accepts_loss_kwargs:" in source
    assert "self.accelerator.num_processes // self.get_tp_size()" in source


def test_causal_lm_loss_is_recognised(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert internals.uses_causal_lm_loss(model)
    model.loss_function = lambda *a, **k: None  # a model with a loss of its own
    assert not internals.uses_causal_lm_loss(model)


def test_attn_implementation_reads_what_set_attn_implementation_writes(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    assert internals.attn_implementation(model.config) == "sdpa"
    model.set_attn_implementation("eager")
    assert internals.attn_implementation(model.config) == "eager"


def test_transformers_sdpa_takes_what_packed_attention_hands_it():
    """`packed_sdpa` hands transformers' sdpa (found through the public AttentionInterface) its arguments by name."""
    from transformers import AttentionInterface, AttentionMaskInterface

    from lorakit.training import attention

    sdpa = attention.sdpa()
    assert sdpa is AttentionInterface()["sdpa"]
    params = inspect.signature(sdpa).parameters
    for name in ("module", "query", "key", "value", "attention_mask", "dropout", "scaling", "is_causal"):
        assert name in params, name
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert callable(AttentionMaskInterface()["sdpa"])


# --- peft and bitsandbytes -----------------------------------------------------------------------------------------


def test_lora_input_casting_switch_is_the_one_peft_flips(tiny_llama):
    """peft's public `disable_input_dtype_casting` flips `cast_input_dtype_enabled` on the same layers lorakit
    does, and a layer with it off hands its input on in its own dtype."""
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)
    with disable_input_dtype_casting(model):
        peft_flipped = [m for m in model.modules() if getattr(m, "cast_input_dtype_enabled", True) is False]
    assert peft_flipped == layers
    assert internals.keep_lora_inputs_as_they_come(model) == len(layers)
    x = torch.ones(2, dtype=torch.bfloat16)
    assert layers[0]._cast_input_dtype(x, torch.float32) is x


@pytest.fixture
def linear4bit():
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.nn.Linear4bit(16, 8, compute_dtype=torch.bfloat16, quant_type="nf4")


def test_linear4bit_has_the_switches_lorakit_sets(linear4bit):
    from bitsandbytes.nn import Linear4bit

    assert linear4bit.compute_dtype == torch.bfloat16
    assert linear4bit.support_avx512bf16_for_cpu in (True, False)  # set from the CPU (0 or 1 here)
    forward = inspect.getsource(Linear4bit.forward)
    assert "self.support_avx512bf16_for_cpu" in forward  # the flag still decides the CPU repacking
    assert "x.to(self.compute_dtype)" in forward  # the layer still computes in its compute dtype
    model = torch.nn.Sequential(linear4bit)
    assert internals.keep_4bit_trainable_on_cpu(model) == 1 and linear4bit.support_avx512bf16_for_cpu is False
    assert internals.quantized_outputs_in_compute_dtype(model) == 1


def test_linear4bit_guard_fires_when_a_switch_is_gone(linear4bit):
    del linear4bit.support_avx512bf16_for_cpu
    with pytest.raises(LorakitError, match=r"^bitsandbytes \S+ no longer has Linear4bit.support_avx512bf16_for_cpu"):
        internals.keep_4bit_trainable_on_cpu(torch.nn.Sequential(linear4bit))


def test_hidden_bitsandbytes_is_absent_for_peft_then_back(monkeypatch):
    """peft caches whether bitsandbytes is available; lorakit hides it and makes peft ask again on both sides."""
    import peft.import_utils as utils

    for name in internals.BNB_ANSWERS:
        assert callable(getattr(utils, name).cache_clear), name
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)  # as in a process that has not imported it
    assert utils.is_bnb_available()
    with internals.without_bitsandbytes(quantized=False):
        assert sys.modules["bitsandbytes"] is None
        assert not utils.is_bnb_available() and not utils.is_bnb_4bit_available()
        with pytest.raises(ImportError):
            import bitsandbytes  # noqa: F401
    assert "bitsandbytes" not in sys.modules
    assert utils.is_bnb_available()
    with internals.without_bitsandbytes(quantized=True):
        assert "bitsandbytes" not in sys.modules  # a quantized base gets it: nothing hidden


def test_forget_bnb_answers_guard_fires_when_peft_stops_caching(monkeypatch):
    import peft.import_utils as utils

    monkeypatch.setattr(utils, "is_bnb_available", lambda: True)
    with pytest.raises(LorakitError, match=r"^peft \S+ no longer has a cached import_utils.is_bnb_available"):
        internals.forget_bnb_answers()


# --- the interpreter -----------------------------------------------------------------------------------------------


def test_exit_handlers_run_before_a_fast_exit():
    """In a process of its own: running every exit handler here would tear down this test session's."""
    code = (
        "import atexit, os\n"
        "from lorakit.internals import run_exit_handlers\n"
        "atexit.register(print, 'handler ran')\n"
        "run_exit_handlers()\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "handler ran\n"


def test_exit_handlers_guard_names_python(monkeypatch):
    import atexit

    monkeypatch.delattr(atexit, "_run_exitfuncs")
    with pytest.raises(LorakitError, match=r"^python \S+ no longer has atexit._run_exitfuncs"):
        internals.run_exit_handlers()


# --- warnings (pyproject.toml's filterwarnings) --------------------------------------------------------------------


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_a_deprecation_from_lorakits_own_code_fails_the_suite(category):
    """A library deprecation lorakit triggers surfaces while the old API still works, not after the upgrade."""
    code = f"import warnings\nwarnings.warn('old API', {category.__name__})\n"
    with pytest.raises(category):
        exec(compile(code, "lorakit/somewhere.py", "exec"), {"__name__": "lorakit.training.somewhere"})
    with pytest.warns(category):  # another package's stays a warning
        exec(compile(code, "other/somewhere.py", "exec"), {"__name__": "lorakitten.somewhere"})


def test_storage_key_tells_meta_storages_apart_and_joins_views():
    from lorakit.internals import storage_key

    a, b = torch.empty(4, 4, device="meta"), torch.empty(4, 4, device="meta")
    assert a.data_ptr() == b.data_ptr() == 0  # why the public identity does not do
    assert storage_key(a) != storage_key(b)
    assert storage_key(a.view(16)) == storage_key(a[1:]) == storage_key(a)


def test_storage_key_guard_fires_when_torch_drops_the_handle():
    from types import SimpleNamespace

    from lorakit.internals import storage_key

    class Changed:  # a tensor whose storage no longer has the handle
        def untyped_storage(self):
            return SimpleNamespace()

    with pytest.raises(LorakitError, match="torch.*_cdata"):
        storage_key(Changed())
