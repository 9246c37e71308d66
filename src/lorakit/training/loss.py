"""The causal-LM loss from the decoder's last hidden states, through the output head a chunk of tokens at a time."""

from __future__ import annotations

import inspect

import torch

from lorakit import internals

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
            torch.log_softmax(full, 1, out=logp[:k])  # into the chunk's buffer (contiguous rows): no copy
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


class LastHidden:
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
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    body = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    if type(head) is not torch.nn.Linear or any(p.requires_grad for p in head.parameters()):
        return None
    if not isinstance(body, torch.nn.Module) or body is lm or not internals.uses_causal_lm_loss(lm):
        return None
    if "logits_to_keep" not in inspect.signature(type(lm).forward).parameters:
        return None
    ids = torch.randint(0, head.weight.shape[0], (1, 8), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.train()  # an eval-mode forward would repack 4-bit weights on the CPU (internals.keep_4bit_trainable_on_cpu)
    try:
        with torch.no_grad(), LastHidden(body) as seen:
            logits = model(input_ids=ids.to(head.weight.device), use_cache=False).logits
            ours = head(seen.hidden.to(head.weight.dtype))
    finally:
        model.train(was_training)
    if logits.shape != ours.shape:
        return None
    scale = ours.float().abs().max().clamp(min=1e-12)
    return (body, head) if (logits.float() - ours.float()).abs().max() <= 1e-3 * scale else None
