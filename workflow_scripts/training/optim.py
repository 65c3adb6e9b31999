"""Optimisation: AdamW with open_clip_train's weight-decay rule, the contrastive backward pass, the update.

Stability: `precision: amp` (fp16) scales the loss with a GradScaler; `accumulation_steps` splits each
process's batch into micro-batches with the same contrastive loss as the whole batch (features of the
other micro-batches are cached, as open_clip_train's accum_freq does); `grad_clip_norm` clips the gradient
norm. A learned logit scale is clamped to at most 100 after every step, as open_clip_train does.
"""

from __future__ import annotations

import contextlib
import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # open_clip_train's rule: no decay on gains, biases, norms and the logit scale.
    def exclude(name, param):
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """open_clip_train's AdamW settings."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)


def contrastive_backward(forward, loss_fn, images, tokens, accumulation: int, autocast, scaler) -> torch.Tensor:
    """Backpropagate the batch's contrastive loss in `accumulation` micro-batches; return the loss.

    Each micro-batch is recomputed with gradients while the others' features come from a no-grad pass,
    so the loss (and its negatives) is that of the whole batch. The logit scale takes its gradient from
    the last micro-batch only, which keeps it the whole batch's gradient (and under DDP every parameter
    is used in the backward pass that all-reduces).
    """
    if accumulation == 1:
        with autocast():
            loss = loss_fn(*forward(images, tokens)[:3])
        scaler.scale(loss).backward()
        return loss.detach()
    image_parts, token_parts = images.chunk(accumulation), tokens.chunk(accumulation)
    with torch.no_grad(), autocast():
        cached = [forward(i, t)[:2] for i, t in zip(image_parts, token_parts)]
    for part in range(accumulation):
        last = part == accumulation - 1
        no_sync = getattr(forward, "no_sync", None)  # DDP: all-reduce once, after the last micro-batch
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext(), autocast():
            image_part, text_part, scale = forward(image_parts[part], token_parts[part])[:3]
            features = [
                torch.cat([c[k] for c in cached[:part]] + [fresh] + [c[k] for c in cached[part + 1 :]])
                for k, fresh in enumerate((image_part, text_part))
            ]
            loss = loss_fn(*features, scale if last else scale.detach())
            scaler.scale(loss).backward()
    return loss.detach()


def global_mean(value: torch.Tensor, distributed: bool, world_size: int) -> float:
    """The mean of `value` over the training processes."""
    if distributed:
        value = value.float().clone()
        torch.distributed.all_reduce(value)
        value /= world_size
    return float(value)


def apply_gradients(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    grad_clip_norm: float | None,
    learned_temperature: bool,
) -> None:
    """Clip (if asked), step the optimizer through the scaler, and clamp a learned logit scale."""
    if grad_clip_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()
    if learned_temperature:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
