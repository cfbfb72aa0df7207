"""LoRA-FAIR server-side correction (Bian et al., ICCV 2025): pure math over tensors, no Flower objects.

Per adapted layer, client k sends A_k (r x d_in) and B_k (d_out x r) with weight p_k (sum 1). The server
keeps Ā = Σ p_k A_k and corrects B̄ = Σ p_k B_k by a residual ΔB that solves the paper's objective

    min_ΔB  S(ΔW, (B̄ + ΔB)·Ā) + λ·‖ΔB‖_F,   S(X, Y) = 1 − cos(vec X, vec Y),   ΔW = Σ p_k B_k A_k,

by gradient steps from the least-squares start below. Every client then starts the next round from
(Ā, B̄ + ΔB).

Solver, and why (scale). S is blind to the scale of (B̄ + ΔB)·Ā, its gradient grows as 1/‖(B̄ + ΔB)·Ā‖,
and λ is in units of 1/B, so a gradient step of fixed size would mean something different on every layer
and every round (LoRA B entries are ~1e-3). We therefore run Adam on U = ΔB / s, where s is the RMS of
B̄'s entries (of the least-squares solution B* = ΔW·Ā⁺ when B̄ = 0): each step moves an entry of ΔB by
about ``lr``·s whatever the scale, and the gradient is multiplied by ‖(B̄ + ΔB)·Ā‖/‖ΔW‖ (same direction,
same stationary points, finite at B = 0). Adam starts at ΔB₀ = t·B* − B̄ (B* = ΔW·Ā⁺, the least-squares
B, t its projection coefficient onto B̄), which already has the best cosine any B reaches with Ā and the
smallest ‖ΔB‖ among such B; a start at ΔB = 0 stalled on rounds with little drift, where the gain is
small (fixed-size Adam steps overshoot it), leaving FedIT's B̄. Adam oscillates near the optimum, so each
layer keeps the iterate with the lowest objective, the start included (or ΔB = 0 where that is lower, as
under a huge λ). The solve does not fix the magnitude: ∂S/∂B is orthogonal to B, so with λ > 0 the
optimum has ‖B̄ + ΔB‖² = ‖B̄‖² − ‖ΔB‖² (it roughly inherits B̄·Ā's magnitude, which is biased like
FedIT's direction), and with λ = 0 the magnitude is left free. On the tests' skewed rounds ‖B̄·Ā‖/‖ΔW‖
was 0.78-0.96 and the raw solve's ‖(B̄ + ΔB)·Ā‖/‖ΔW‖ 0.83-1.06. ``match_norm`` (a named extension, off by
default as in the paper) makes the magnitude explicit: after the solve, B̄ + ΔB is rescaled along its own
ray so that ‖(B̄ + ΔB)·Ā‖_F = ‖ΔW‖_F, the magnitude of the ideal update. That changes no cosine, touches
only B (Ā stays), and is included in ΔB and ``delta_norm``. A layer whose cosine the solve did not raise
gets ΔB = 0 before that rescaling: the cosine is never lowered.

The gradient uses ⟨ΔW, BĀ⟩ = ⟨ΔW·Āᵀ, B⟩ and ‖BĀ‖² = ⟨B·ĀĀᵀ, B⟩, so each step costs O(d_out·r²) per
layer; layers of one shape are stacked and solved together, on the inputs' device, in float64.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.core.config import ConfigError
from fedlora.core.model.arrays import State
from strategies.aggregation import weighted_average
from strategies.base import LoraStrategy
from strategies.lowrank import layer_groups, product_average
from strategies.registry import register

_TINY = 1e-30  # guards divisions by a zero norm
_WINDOW = 10  # steps over which the stopping rule measures progress
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8  # Adam's usual constants (written out: torch.optim's first use
# imports torch._dynamo, about 1 s, and would need one parameter group per layer for per-layer step sizes)


@dataclass(frozen=True)
class FairSettings:
    """Solver settings for the LoRA-FAIR residual ΔB.

    lam: λ, weight of ‖ΔB‖_F in the objective, in units of 1/B (default 0.01; 0 allowed). With LoRA's B
        entries of ~1e-3, 0.01 barely moves the optimum; larger values shrink ΔB.
    steps: maximum Adam steps per layer (default 200; the tests' round-shaped layers stop after 60-155).
    lr: Adam step size relative to the layer's scale s, the RMS of B̄'s entries (of B* = ΔW·Ā⁺ if B̄ = 0):
        each step moves an entry of ΔB by about lr·s at most (default 0.01: from the least-squares start,
        0.05 overshoots the small trade of cosine for ‖ΔB‖ that λ asks, missing the optimum's objective
        by up to 9e-5 on the tests' rounds; 0.01 ends within 3e-6 of a 3,000-step solve).
    tol: a layer stops when its lowest objective 1 − cos + λ‖ΔB‖_F fell by at most tol (absolute) over the
        last 10 steps (default 1e-6; cosines then end within ~1e-5 of the optimum).
    match_norm: a named extension, not in the paper: rescale B̄ + ΔB so that ‖(B̄ + ΔB)·Ā‖_F = ‖ΔW‖_F
        after the solve (default False, as the paper).
    """

    lam: float = 0.01
    steps: int = 200
    lr: float = 0.01
    tol: float = 1e-6
    match_norm: bool = False

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0 (relative to the RMS of B̄), got {self.lr}")
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")


DEFAULT_SETTINGS = FairSettings()


@dataclass(frozen=True)
class FairResult:
    """One layer's correction: delta_b (d_out x r, B̄'s dtype and device) and its diagnostics."""

    delta_b: Tensor  # (d_out, r)
    cos_before: float  # cos(ΔW, B̄Ā)
    cos_after: float  # cos(ΔW, (B̄ + ΔB)Ā)
    delta_norm: float  # ‖ΔB‖_F


def best_cosine(a_bar: Tensor, delta_w: Tensor) -> float:
    """cos(ΔW, B*Ā) with B* = ΔW·Ā⁺: the highest cosine any B can reach with this Ā (float64)."""
    a, w = a_bar.to(torch.float64), delta_w.to(torch.float64)
    return _cos(w, w @ torch.linalg.pinv(a) @ a)


def fair_correct(
    a_bar: Tensor, b_bar: Tensor, delta_w: Tensor, settings: FairSettings = DEFAULT_SETTINGS
) -> FairResult:
    """LoRA-FAIR residual ΔB for one layer (Ā: r x d_in, B̄: d_out x r, ΔW: d_out x d_in)."""
    return fair_correct_layers({"layer": (a_bar, b_bar, delta_w)}, settings)["layer"]


def fair_correct_layers(
    layers: Mapping[str, tuple[Tensor, Tensor, Tensor]], settings: FairSettings = DEFAULT_SETTINGS
) -> dict[str, FairResult]:
    """LoRA-FAIR residual ΔB for every layer (name -> (Ā, B̄, ΔW)); layers of one shape are solved together."""
    groups: dict[tuple[object, ...], list[str]] = {}
    for name, (a, b, w) in layers.items():
        _check_shapes(name, a, b, w)
        groups.setdefault((tuple(a.shape), tuple(b.shape), a.device), []).append(name)
    results: dict[str, FairResult] = {}
    for names in groups.values():
        device = layers[names[0]][0].device
        dtype = _compute_dtype(device)
        a_bar, b_bar, delta_w = (
            torch.stack([layers[n][i].to(device, dtype) for n in names]) for i in range(3)
        )
        delta_b, before, after = _solve(a_bar, b_bar, delta_w, settings)
        for i, name in enumerate(names):
            db = delta_b[i].to(layers[name][1].dtype)
            results[name] = FairResult(db, float(before[i]), float(after[i]), float(delta_b[i].norm()))
    return {name: results[name] for name in layers}


def _compute_dtype(device: torch.device) -> torch.dtype:
    """float64 (the solve is cheap in r-space), float32 where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _check_shapes(name: str, a: Tensor, b: Tensor, w: Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or tuple(w.shape) != (b.shape[0], a.shape[1]):
        raise ValueError(
            f"layer {name!r}: expected Ā (r, d_in), B̄ (d_out, r), ΔW (d_out, d_in), got "
            f"{tuple(a.shape)}, {tuple(b.shape)}, {tuple(w.shape)}"
        )


def _cos(x: Tensor, y: Tensor) -> float:
    return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(_TINY))


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """Batched Frobenius inner product over the last two dims: (L, m, n) x (L, m, n) -> (L,)."""
    return (x * y).sum(dim=(-2, -1))


def _col(x: Tensor) -> Tensor:
    """(L,) -> (L, 1, 1), to broadcast one value per layer over a matrix."""
    return x[:, None, None]


class _Problem:
    """The objective of L stacked layers, reduced to r-space: G = ΔW·Āᵀ (L, d_out, r), M = ĀĀᵀ (L, r, r)."""

    def __init__(self, a_bar: Tensor, b_bar: Tensor, delta_w: Tensor, lam: float) -> None:
        self.b_bar, self.lam = b_bar, lam
        self.g = delta_w @ a_bar.transpose(-2, -1)
        self.m = a_bar @ a_bar.transpose(-2, -1)
        self.w_norm = delta_w.norm(dim=(-2, -1))

    def product_norm(self, b: Tensor) -> Tensor:
        """‖BĀ‖_F per layer."""
        return _dot(b @ self.m, b).clamp_min(0).sqrt()

    def cos(self, b: Tensor) -> Tensor:
        """cos(ΔW, BĀ) per layer (0 where either is zero)."""
        return _dot(self.g, b) / (self.w_norm * self.product_norm(b)).clamp_min(_TINY)

    def objective_and_grad(self, delta_b: Tensor) -> tuple[Tensor, Tensor]:
        """1 − cos + λ‖ΔB‖_F per layer, and its gradient in ΔB times ‖BĀ‖/‖ΔW‖ (subgradient 0 at ΔB = 0).

        That positive factor per layer keeps the descent direction and the stationary points, and cancels the
        1/‖BĀ‖ growth of the scale-invariant S's gradient, which is therefore finite even at B = 0.
        """
        b = self.b_bar + delta_b
        bm = b @ self.m
        y_norm = _dot(bm, b).clamp_min(0).sqrt()
        w_norm = self.w_norm.clamp_min(_TINY)
        cos = _dot(self.g, b) / (w_norm * y_norm).clamp_min(_TINY)
        d_norm = delta_b.norm(dim=(-2, -1))
        # ∂cos/∂B = G/(‖ΔW‖‖BĀ‖) − cos·BM/‖BĀ‖² (orthogonal to B), times ‖BĀ‖/‖ΔW‖
        grad_cos = (self.g / _col(w_norm) - _col(cos / y_norm.clamp_min(_TINY)) * bm) / _col(w_norm)
        grad_lam = _col(self.lam * y_norm / (w_norm * d_norm.clamp_min(_TINY))) * delta_b
        return 1 - cos + self.lam * d_norm, grad_lam - grad_cos

    def start(self) -> Tensor:
        """ΔB₀ = t·B* − B̄ per layer, the point of the best-cosine ray {t·B*, t > 0} (B* = ΔW·Ā⁺ = G·M⁺)
        nearest to B̄ in ‖·‖_F: t = ⟨B*, B̄⟩ / ‖B*‖², or t = 1 where that is not positive (B̄ = 0, or
        pointing away). Its cosine is the highest any B reaches with this Ā, and its penalty λ‖ΔB₀‖_F
        the lowest among such B, so the solve starts within λ‖ΔB₀‖_F of the optimum's objective and
        only improves on it: on rounds with little drift, where a start at ΔB = 0 needs many small
        steps, no step is needed to reach the best cosine."""
        b_star = self.g @ torch.linalg.pinv(self.m)
        t = _dot(b_star, self.b_bar) / _dot(b_star, b_star).clamp_min(_TINY)
        t = torch.where(t > 0, t, torch.ones_like(t))
        return _col(t) * b_star - self.b_bar

    def step_scale(self) -> Tensor:
        """s per layer, (L, 1, 1): RMS of B̄'s entries, or of B* = ΔW·Ā⁺ = G·M⁺ where B̄ is zero."""
        rms_bar = self.b_bar.pow(2).mean(dim=(-2, -1)).sqrt()
        rms_star = (self.g @ torch.linalg.pinv(self.m)).pow(2).mean(dim=(-2, -1)).sqrt()
        return _col(torch.where(rms_bar > 0, rms_bar, rms_star).clamp_min(_TINY))


def _adam(problem: _Problem, settings: FairSettings) -> Tensor:
    """Adam on U = ΔB / s from the better of ΔB = 0 and the least-squares start (:meth:`_Problem.start`)
    per layer; returns each layer's lowest-objective ΔB until it stopped (the start included, so the
    objective never ends above either)."""
    scale = problem.step_scale()
    m, v, best = (torch.zeros_like(problem.b_bar) for _ in range(3))
    start = problem.start()
    at_zero, _ = problem.objective_and_grad(torch.zeros_like(start))
    at_start, _ = problem.objective_and_grad(start)
    u = torch.where(_col(at_start < at_zero), start, 0) / scale
    history = [torch.full_like(problem.w_norm, float("inf"))]  # lowest objective so far, per layer
    done = torch.zeros_like(problem.w_norm, dtype=torch.bool)  # a stopped layer keeps its best ΔB
    for step in range(settings.steps + 1):
        delta_b = u * scale
        obj, grad = problem.objective_and_grad(delta_b)
        improved = (obj < history[-1]) & ~done
        best = torch.where(_col(improved), delta_b, best)
        history.append(torch.where(improved, obj, history[-1]))
        if len(history) > _WINDOW:
            done |= history[-_WINDOW - 1] - history[-1] <= settings.tol
        if step == settings.steps or bool(done.all()):
            break
        grad = grad * scale  # the gradient in U
        m.lerp_(grad, 1 - _BETA1)
        v.lerp_(grad * grad, 1 - _BETA2)
        m_hat, v_hat = m / (1 - _BETA1 ** (step + 1)), v / (1 - _BETA2 ** (step + 1))
        u -= settings.lr * m_hat / (v_hat.sqrt() + _EPS)
    return best


def _solve(
    a_bar: Tensor, b_bar: Tensor, delta_w: Tensor, settings: FairSettings
) -> tuple[Tensor, Tensor, Tensor]:
    """Stacked Ā (L, r, d_in), B̄ (L, d_out, r), ΔW (L, d_out, d_in) -> ΔB (L, d_out, r), cos before, after."""
    problem = _Problem(a_bar, b_bar, delta_w, settings.lam)
    before = problem.cos(b_bar)
    delta_b = _adam(problem, settings)
    delta_b = torch.where(_col(problem.cos(b_bar + delta_b) >= before), delta_b, 0)  # never lower cos
    if settings.match_norm:
        b = b_bar + delta_b
        y_norm = problem.product_norm(b)
        ratio = torch.where((y_norm > 0) & (problem.w_norm > 0), problem.w_norm / y_norm.clamp_min(_TINY), 1)
        delta_b = _col(ratio) * b - b_bar
    return delta_b, before, problem.cos(b_bar + delta_b)


# ----- the strategy (Flower plumbing is in strategies.base) -----------------------------------------


@dataclass
class FairOptions:
    """LoRA-FAIR options (``strategy.options``): the solver settings of :class:`FairSettings`."""

    lam: float = DEFAULT_SETTINGS.lam
    steps: int = DEFAULT_SETTINGS.steps
    lr: float = DEFAULT_SETTINGS.lr
    tol: float = DEFAULT_SETTINGS.tol
    match_norm: bool = DEFAULT_SETTINGS.match_norm

    def __post_init__(self) -> None:
        try:
            FairSettings(**dataclasses.asdict(self))
        except ValueError as exc:
            raise ConfigError(f"strategy.options: {exc}") from None


def fair_aggregate(
    updates: Sequence[Mapping[str, Tensor]], weights: Sequence[float], settings: FairSettings
) -> tuple[dict[str, Tensor], dict[str, FairResult]]:
    """FedAvg of every tensor, then B̄ += ΔB per adapted layer; returns the new state and per-layer results."""

    state = weighted_average(updates, weights)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers = {}
    for layer, (key_a, key_b) in layer_groups(state).items():
        delta_w = product_average([u[key_a] for u in updates], [u[key_b] for u in updates], weights)
        layers[layer] = (state[key_a].to(device), state[key_b].to(device), delta_w.to(device))
    results = fair_correct_layers(layers, settings)
    for layer, (_, key_b) in layer_groups(state).items():
        state[key_b] = state[key_b] + results[layer].delta_b.to(state[key_b].device, state[key_b].dtype)
    return state, results


@register("lora-fair")
class LoraFair(LoraStrategy):
    """FedAvg, then the server corrects B̄ so that (B̄+ΔB)·Ā points like Σ p_k B_k A_k."""

    description = "FedAvg + server-side residual ΔB so (B̄+ΔB)·Ā matches Σ p_k B_k A_k (cosine, λ‖ΔB‖)"
    Options = FairOptions
    nonlinear_reason = (
        "its correction needs the sum of the clients' products B_k A_k (d_out x d_in per adapted layer), "
        "which clients do not send"
    )

    def aggregate(self, global_state: State, updates: Sequence[State], weights: Sequence[float]) -> State:
        started = time.perf_counter()
        state, results = fair_aggregate(updates, weights, FairSettings(**dataclasses.asdict(self.options)))
        n = max(len(results), 1)
        self._diagnostics = {
            "fair_cos_before": sum(r.cos_before for r in results.values()) / n,
            "fair_cos_after": sum(r.cos_after for r in results.values()) / n,
            "fair_delta_norm": sum(r.delta_norm for r in results.values()) / n,
            "fair_solve_s": time.perf_counter() - started,
        }
        return state

    def diagnostics(self) -> dict[str, float]:
        """Layer means of cos(ΔW, B̄Ā), cos(ΔW, (B̄+ΔB)Ā), ‖ΔB‖_F, and the correction's time (s)."""
        return dict(getattr(self, "_diagnostics", {}))
