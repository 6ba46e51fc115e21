"""AdamW for our training loops, without ``torch.optim.Optimizer``'s import of ``torch._dynamo``.

Why not ``torch.optim.AdamW``: its base class imports ``torch._dynamo`` (about 1 s of a training stage's
process on the 2-core CI machine; ``bench.repro`` times the stages) in ``__init__``, ``zero_grad`` and
every ``step()`` (the ``_disable_dynamo`` and ``_use_grad_for_differentiable`` wrappers), even in eager
mode where nothing is compiled. Three processes of ``make repro`` pay it (``pretrain_smoke`` and both
projector stages). The update itself is torch's own functional kernel, ``torch.optim.adam.adam`` with
``decoupled_weight_decay=True`` (what ``torch.optim.AdamW.step`` calls), with the same state (a float32
step count, first and second moments per parameter): ``tests/test_adamw.py`` checks it bit for bit against
``torch.optim.AdamW``, with and without a ``GradScaler``.

The class is what ``torch.amp.GradScaler`` needs (``param_groups`` and ``step()``); a learning-rate
schedule is set by writing ``group["lr"]`` before each step (``LambdaLR`` only accepts a torch Optimizer).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch.optim.adam import adam as _adam_kernel


class AdamW:
    """Decoupled-weight-decay Adam over parameter groups (dicts with ``params`` and optional overrides)."""

    def __init__(self, param_groups: Iterable[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        self.param_groups: list[dict] = []
        seen: set[int] = set()
        for group in param_groups:
            params = list(group["params"])
            if any(id(p) in seen for p in params):
                raise ValueError("a parameter appears in more than one AdamW parameter group")
            seen.update(id(p) for p in params)
            self.param_groups.append({**defaults, **group, "params": params})
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state.get(p)
                if state is None:
                    # torch.optim.AdamW's own initial state for a non-capturable, non-fused run
                    state = self.state[p] = {
                        "step": torch.tensor(0.0, dtype=torch.float32),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            _adam_kernel(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=None, capturable=False,
                         differentiable=False, fused=None, grad_scale=None, found_inf=None,
                         has_complex=any(torch.is_complex(p) for p in params), decoupled_weight_decay=True,
                         amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                         weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
