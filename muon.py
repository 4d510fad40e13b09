"""Muon on every weight matrix and kernel, AdamW on the vectors: ``train.py --optimizer muon`` (not the paper's).

Muon (K. Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks") steps a weight W of m rows
(a kernel is viewed as its m × (in · k · k) matrix) along its Nesterov momentum, orthogonalised:

    M ← μ M + G,    O = NS(G + μ M) ≈ U Vᵀ  where  G + μ M = U Σ Vᵀ,
    W ← (1 − η λ) W − η · 0.2 √max(m, n) · O,

NS five steps of the quintic Newton–Schulz iteration X ← a X + (b XXᵀ + c (XXᵀ)²) X, (a, b, c) = (3.4445, −4.7750,
2.0315), from X = (G + μ M) / ‖G + μ M‖_F: it drives every singular value towards ~1 (into about [0.7, 1.2]) and
keeps the singular vectors. The factor 0.2 √max(m, n) gives O the RMS of an AdamW step (J. Liu et al. 2025, "Muon is
scalable for LLM training"), so AdamW's lr and weight decay carry over. Vectors (biases, norms' scales) step with
torch's AdamW (``torch.optim.adamw.adamw``).

``torch.optim.Muon`` takes 2-D matrices only, and on our small FINOLA the convolutions' kernels are a good part of
what Muon gains (EXPERIMENTS.md), so the iteration is written here. The updates are orthogonalised in one batch per
shape, each zero-padded to powers of two (the iteration keeps a zero border zero, so each block comes out as it
would alone), in bfloat16 from 128 rows as in Jordan's Muon (3.4x faster than float32 on this CPU's AMX), in
float32 below (faster there for small matrices).
"""
from collections import defaultdict

import torch
from torch.optim.adamw import adamw

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
NS_DTYPE_FROM = 128  # padded rows from which the iteration runs in Muon's ns_dtype (bfloat16), float32 below


def orthogonalise(g: torch.Tensor, *, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """≈ U Vᵀ of each matrix ``g[..., m, n]`` = U Σ Vᵀ by ``steps`` Newton–Schulz steps (the equation above)."""
    a, b, c = NEWTON_SCHULZ
    x = g / (torch.linalg.matrix_norm(g, keepdim=True) + eps)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (above) on each parameter of ≥ 2 dimensions, its Newton–Schulz iteration in ``ns_dtype``, AdamW
    (``betas``, ``eps``) on the others; each group's ``lr`` and ``weight_decay`` (decoupled, as AdamW's) apply to
    both kinds."""

    def __init__(self, params, *, lr: float, weight_decay: float = 0.1, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, fused: bool | None = None,
                 ns_dtype: torch.dtype = torch.bfloat16):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr, weight_decay: expected numbers >= 0, got {lr}, {weight_decay}")
        if not 0 <= momentum < 1 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"momentum, betas: expected numbers in [0, 1), got {momentum}, {tuple(betas)}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, betas=tuple(betas),
                                      eps=eps))
        self.fused, self.ns_dtype = fused, ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            self._muon(group, [p for p in params if p.dim() >= 2])
            self._adamw(group, [p for p in params if p.dim() < 2])
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]):
        if not params:
            return
        for p in params:
            if "momentum" not in self.state[p]:
                self.state[p]["momentum"] = torch.zeros_like(p)
        grads, buffers = [p.grad for p in params], [self.state[p]["momentum"] for p in params]
        mu, lr = group["momentum"], group["lr"]
        torch._foreach_mul_(buffers, mu)
        torch._foreach_add_(buffers, grads)
        updates = torch._foreach_add(grads, buffers, alpha=mu)  # Nesterov: G + μ M
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        buckets = defaultdict(list)  # each update as a wide matrix, by its shape padded to powers of two
        for i, u in enumerate(updates):
            matrix = u.reshape(len(u), -1)
            tall = matrix.shape[0] > matrix.shape[1]
            matrix = matrix.mT if tall else matrix
            buckets[tuple(1 << (side - 1).bit_length() for side in matrix.shape)].append((i, matrix, tall))
        for (m, n), items in buckets.items():
            dtype = self.ns_dtype if m >= NS_DTYPE_FROM else torch.float32
            batch = torch.zeros(len(items), m, n, dtype=dtype, device=items[0][1].device)
            for k, (_, matrix, _) in enumerate(items):
                batch[k, :matrix.shape[0], :matrix.shape[1]] = matrix
            o = orthogonalise(batch)
            for k, (i, matrix, tall) in enumerate(items):
                o_i = o[k, :matrix.shape[0], :matrix.shape[1]]
                o_i = (o_i.mT if tall else o_i).reshape(params[i].shape).to(params[i].dtype)
                params[i].add_(o_i, alpha=-lr * 0.2 * max(matrix.shape) ** 0.5)

    def _adamw(self, group: dict, params: list[torch.Tensor]):
        if not params:
            return
        for p in params:
            if "step" not in self.state[p]:
                self.state[p].update(step=torch.zeros((), device=p.device if self.fused else "cpu"),
                                     exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state = [self.state[p] for p in params]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state], [],
              [s["step"] for s in state], fused=self.fused, amsgrad=False, beta1=group["betas"][0],
              beta2=group["betas"][1], lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
              maximize=False)
