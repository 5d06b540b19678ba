"""Flow-matching samplers: UniPC multistep (Wan's default) and Euler, as plain tensor code.

Semantics are the official Wan2.1 ``FlowUniPCMultistepScheduler`` (``wan/utils/fm_solvers_unipc.py``),
which is Diffusers' ``UniPCMultistepScheduler(prediction_type="flow_prediction",
use_flow_sigmas=True, flow_shift=shift)`` with one difference, the sigma grid:

* official (``schedule="wan"``, the default): ``linspace(sigma_max, 0, steps + 1)[:-1]`` with
  ``sigma_max = float32(1 - 1/1000)`` (0.999), then shifted:
  ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``; 50 steps at shift 5 give the timesteps
  999, 995, 991, 987, 982, ..., 241, 172, 92.
* Diffusers (``schedule="diffusers"``): ``linspace(1, 1/1000, steps + 1)[:-1]``, shifted, the first
  sigma nudged by 1e-6 off 1 (the last timestep is then 96 instead of 92).

In both, the timesteps fed to the model are ``int64(sigma * 1000)`` (truncated), the sigmas
(with a final 0) are float32, and the UniPC update is computed with float32 0-dim tensors exactly
as both reference implementations do (bh2, order 2, lower order at the final step, corrector
after every step but the first), so the step outputs match Diffusers' to float32 rounding.

Euler follows Diffusers' ``FlowMatchEulerDiscreteScheduler`` on the same sigma grid:
``x_next = x + (sigma_next - sigma) * v`` in float32, with the (non-integer) timesteps
``sigma * 1000`` fed to the model.

Every sampler is deterministic and identical on every rank: same inputs, same outputs.
Nothing here imports Diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
SOLVERS = ("unipc", "euler")
SCHEDULES = ("wan", "diffusers")


@dataclass(frozen=True)
class FlowSchedule:
    """A flow-matching noise schedule.

    Attributes:
        sigmas: float32 ``[steps + 1]`` noise levels, decreasing, ending with 0.
        timesteps: ``[steps]`` what the model is fed at each step (int64 for UniPC, float32 for Euler).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """``shift * s / (1 + (shift - 1) * s)`` (float64): spends more steps at high noise for shift > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(steps: int, shift: float, schedule: str = "wan", num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The ``steps`` shifted sigmas (float64, without the final 0) of ``schedule`` (``"wan"`` or ``"diffusers"``)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule == "wan":
        # FlowUniPCMultistepScheduler.__init__: sigmas = 1 - linspace(1, 1/T, T)[::-1] in float32;
        # sigma_max / sigma_min are its first / last entries (.item() of float32 values).
        train = (1.0 - np.linspace(1, 1 / num_train_timesteps, num_train_timesteps)[::-1]).astype(np.float32)
        sigma_max, sigma_min = float(train[0]), float(train[-1])
        sig = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]
        return shift_sigmas(sig, shift)
    if schedule == "diffusers":
        sig = np.linspace(1, 1 / num_train_timesteps, steps + 1)[:-1]
        sig = shift_sigmas(sig, shift)
        if np.fabs(sig[0] - 1) < 1e-6:
            sig[0] -= 1e-6
        return sig
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def make_schedule(
    steps: int, shift: float, *, solver: str = "unipc", schedule: str = "wan", num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> FlowSchedule:
    """Sigmas and model timesteps for ``steps`` steps at ``shift``.

    UniPC feeds integer timesteps (``int64(sigma * T)``, as the official scheduler); Euler feeds
    ``sigma * T`` as float32 (as Diffusers' FlowMatchEulerDiscreteScheduler).
    """
    sig = flow_sigmas(steps, shift, schedule, num_train_timesteps)
    t = sig * num_train_timesteps
    if solver == "unipc":
        timesteps = torch.from_numpy(t).to(torch.int64)
    elif solver == "euler":
        timesteps = torch.from_numpy(t.astype(np.float32))
    else:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
    return FlowSchedule(sigmas=sigmas, timesteps=timesteps)


def step_list_schedule(step_list, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> FlowSchedule:
    """The schedule of a step-distilled model (LightX2V's ``denoising_step_list``, e.g. ``[1000, 750, 500, 250]``).

    As LightX2V's ``WanStepDistillScheduler``: the ``T`` training sigmas ``linspace(1, 0, T + 1)[:-1]`` (float32),
    shifted, and step ``k`` at training index ``T - step_list[k]``; the model is fed ``sigma * T``. Its update
    ``x0 = x - sigma * v``, then ``x0 + sigma_next * v`` (``x0`` after the last step) is the Euler step over
    these sigmas followed by 0, so :class:`EulerSampler` runs it.

    Args:
        step_list: strictly decreasing integers in ``[1, T]``.
        shift: the flow shift (``sample_shift``).
    """
    steps = [int(x) for x in step_list]
    if not steps or any(not 1 <= x <= num_train_timesteps for x in steps) or any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"denoising_step_list must be strictly decreasing integers in [1, {num_train_timesteps}], "
                         f"got {list(step_list)}")
    sig = torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
    sig = shift * sig / (1 + (shift - 1) * sig)
    picked = sig[[num_train_timesteps - x for x in steps]]
    return FlowSchedule(sigmas=torch.cat([picked, picked.new_zeros(1)]), timesteps=picked * num_train_timesteps)


class FlowSampler:
    """Base class: holds the schedule and the step counter. ``step(v, x)`` returns the next sample."""

    name = "base"

    def __init__(self, schedule: FlowSchedule):
        self.schedule = schedule
        self.step_index = 0

    @property
    def timesteps(self) -> torch.Tensor:
        return self.schedule.timesteps

    @property
    def sigmas(self) -> torch.Tensor:
        return self.schedule.sigmas

    def __len__(self) -> int:
        return self.schedule.steps

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        return {
            "solver": self.name,
            "steps": len(self),
            "timesteps": [float(t) if t.is_floating_point() else int(t) for t in self.timesteps],
        }


class EulerSampler(FlowSampler):
    """First-order flow-matching Euler: ``x + (sigma_next - sigma) * v`` in float32."""

    name = "euler"

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i = self.step_index
        if i >= len(self):
            raise RuntimeError(f"sampler already took all {len(self)} steps")
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        dt = (sigma_next - sigma).to(sample.device)
        out = sample.to(torch.float32) + dt * model_output
        self.step_index += 1
        return out.to(model_output.dtype)


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """log-SNR of a flow sigma: ``log(1 - sigma) - log(sigma)`` (0-dim float32)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class UniPCSampler(FlowSampler):
    """UniPC multistep (predictor UniP + corrector UniC, B(h) = expm1(h) "bh2"), data prediction, flow sigmas.

    Args:
        schedule: sigmas and timesteps (:func:`make_schedule`).
        order: solver order (2, as Wan; the effective order with the corrector is ``order + 1``).
        solver_type: ``"bh2"`` (Wan) or ``"bh1"``.
        lower_order_final: use lower orders on the final steps (on in Wan and Diffusers).
        disable_corrector: step indices after which no corrector is applied.
    """

    name = "unipc"

    def __init__(
        self,
        schedule: FlowSchedule,
        *,
        order: int = 2,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: tuple[int, ...] = (),
    ):
        super().__init__(schedule)
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if solver_type not in ("bh1", "bh2"):
            raise ValueError(f"solver_type must be bh1 or bh2, got {solver_type!r}")
        self.order = order
        self.solver_type = solver_type
        self.lower_order_final = lower_order_final
        self.disable_corrector = tuple(disable_corrector)
        self.model_outputs: list[torch.Tensor | None] = [None] * order
        self.last_sample: torch.Tensor | None = None
        self.lower_order_nums = 0
        self.this_order = 1

    # ---- the two updates (both reference implementations' arithmetic, op for op) ------------
    def _coefficients(self, rks: list[torch.Tensor], h: torch.Tensor, order: int):
        rk = torch.stack([*rks, torch.ones(())])
        hh = -h  # data prediction
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        b_h = hh if self.solver_type == "bh1" else torch.expm1(hh)
        r_rows, b = [], []
        for i in range(1, order + 1):
            r_rows.append(torch.pow(rk, i - 1))
            b.append(h_phi_k * factorial_i / b_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        return torch.stack(r_rows), torch.stack(b), h_phi_1, b_h

    def _predict(self, sample: torch.Tensor, order: int) -> torch.Tensor:
        """UniP: from ``sample`` at ``sigmas[i]`` to ``sigmas[i + 1]``."""
        i = self.step_index
        dev = sample.device
        m0 = self.model_outputs[-1]
        sigma_t, sigma_s0 = self.sigmas[i + 1], self.sigmas[i]
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        rks, d1s = [], []
        for k in range(1, order):
            mk = self.model_outputs[-(k + 1)]
            rk = (_lambda(self.sigmas[i - k]) - lambda_s0) / h
            rks.append(rk)
            d1s.append((mk - m0) / rk.to(dev))
        r_mat, b, h_phi_1, b_h = self._coefficients(rks, h, order)
        x_t_ = (sigma_t / sigma_s0).to(dev) * sample - (alpha_t * h_phi_1).to(dev) * m0
        if d1s:
            if order == 2:
                rhos_p = torch.ones(1, dtype=sample.dtype, device=dev) * 0.5
            else:
                rhos_p = torch.linalg.solve(r_mat[:-1, :-1], b[:-1]).to(dev).to(sample.dtype)
            pred_res = torch.einsum("k,bkc...->bc...", rhos_p, torch.stack(d1s, dim=1))
            x_t = x_t_ - (alpha_t * b_h).to(dev) * pred_res
        else:
            x_t = x_t_
        return x_t.to(sample.dtype)

    def _correct(self, this_output: torch.Tensor, last_sample: torch.Tensor, order: int) -> torch.Tensor:
        """UniC: refine the sample at ``sigmas[i]`` with the model output just computed there."""
        i = self.step_index
        dev = last_sample.device
        m0 = self.model_outputs[-1]
        sigma_t, sigma_s0 = self.sigmas[i], self.sigmas[i - 1]
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        rks, d1s = [], []
        for k in range(1, order):
            mk = self.model_outputs[-(k + 1)]
            rk = (_lambda(self.sigmas[i - (k + 1)]) - lambda_s0) / h
            rks.append(rk)
            d1s.append((mk - m0) / rk.to(dev))
        r_mat, b, h_phi_1, b_h = self._coefficients(rks, h, order)
        if order == 1:
            rhos_c = torch.ones(1, dtype=last_sample.dtype, device=dev) * 0.5
        else:
            rhos_c = torch.linalg.solve(r_mat, b).to(dev).to(last_sample.dtype)
        x_t_ = (sigma_t / sigma_s0).to(dev) * last_sample - (alpha_t * h_phi_1).to(dev) * m0
        corr_res = torch.einsum("k,bkc...->bc...", rhos_c[:-1], torch.stack(d1s, dim=1)) if d1s else 0
        d1_t = this_output - m0
        x_t = x_t_ - (alpha_t * b_h).to(dev) * (corr_res + rhos_c[-1] * d1_t)
        return x_t.to(last_sample.dtype)

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """One UniPC step.

        Args:
            model_output: the (guided) flow prediction ``v`` at the current step, like ``sample``.
            sample: the current noisy sample ``x`` at ``sigmas[step_index]``.

        Returns:
            The sample at ``sigmas[step_index + 1]`` (the step counter advances).
        """
        i = self.step_index
        if i >= len(self):
            raise RuntimeError(f"sampler already took all {len(self)} steps")
        sigma = self.sigmas[i].to(sample.device)
        x0 = sample - sigma * model_output  # data prediction of a flow model
        if i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None:
            sample = self._correct(x0, self.last_sample, self.this_order)
        self.model_outputs = [*self.model_outputs[1:], x0]
        this_order = min(self.order, len(self) - i) if self.lower_order_final else self.order
        self.this_order = min(this_order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev = self._predict(sample, self.this_order)
        if self.lower_order_nums < self.order:
            self.lower_order_nums += 1
        self.step_index += 1
        return prev


def make_sampler(solver: str, steps: int, shift: float, *, schedule: str = "wan", step_list=None) -> FlowSampler:
    """A fresh sampler (one per request: samplers hold state).

    Args:
        solver: ``"unipc"`` or ``"euler"``.
        steps: denoising steps.
        shift: flow shift (``sample_shift``).
        schedule: ``"wan"`` (official sigma grid) or ``"diffusers"``.
        step_list: a step-distilled model's ``denoising_step_list`` (then ``steps`` must be its length; the
            solver and schedule do not apply): :func:`step_list_schedule` run by Euler.
    """
    if step_list:
        if len(step_list) != steps:
            raise ValueError(f"denoising_step_list has {len(step_list)} steps, the request {steps}")
        sampler = EulerSampler(step_list_schedule(step_list, shift))
        sampler.name = "step_list"
        return sampler
    sched = make_schedule(steps, shift, solver=solver, schedule=schedule)
    return UniPCSampler(sched) if solver == "unipc" else EulerSampler(sched)
