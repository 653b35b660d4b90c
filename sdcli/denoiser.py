"""From a noise-predicting UNet to the denoiser samplers walk, with classifier-free guidance.

Every sampler, DDIM and DDPM included, sees `D(x, sigma) -> x0` (k-diffusion's contract), built here from
one guided UNet call: the conditional and unconditional inputs go through the UNet in one batch (cfg 1
skips the unconditional half), and eps- or v-prediction is turned into x0 in one place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdcli.conditioning import TextConditioning
from sdcli.schedules import sigma_to_t, sigmas_from_alphas_cumprod

UNetFn = Callable[[torch.Tensor, torch.Tensor, TextConditioning], torch.Tensor]


def guided_unet(
    unet: UNetFn, cond: TextConditioning, uncond: TextConditioning | None, cfg: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The UNet with classifier-free guidance folded in: `(x, t) -> output` for a batch of images.

    `cond` and `uncond` hold a batch of prompts' conditioning each; guided calls run both halves as one
    batch, concatenated field by field, when their contexts have the same number of tokens, and as two
    calls otherwise (long prompts: A1111's default, no padding). The prediction is
    uncond + cfg * (cond - uncond), which for eps and for v alike is linear, so guidance in eps, v or x0
    space gives the same result.
    """
    guided = uncond is not None and cfg != 1.0
    same_length = guided and uncond.context.shape[1] == cond.context.shape[1]
    both = TextConditioning.cat([uncond, cond]) if same_length else None

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not guided:
            return unet(x, t, cond)
        if both is not None:
            out_uncond, out_cond = unet(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        else:
            out_uncond, out_cond = unet(x, t, uncond), unet(x, t, cond)
        return out_uncond + cfg * (out_cond - out_uncond)

    return predict


class DiscreteDenoiser:
    """k-diffusion's CompVisDenoiser / CompVisVDenoiser: a model trained on 1000 discrete steps as `D(x, sigma)`.

    Sampling runs in float32; the model callable casts to and from its own dtype. The input is scaled to
    unit variance, sigma is mapped to a (fractional) training step by log-sigma
    interpolation, and the model's eps (or v) prediction is turned into the denoised image x0.
    """

    def __init__(self, model: Callable, alphas_cumprod: torch.Tensor, prediction: str = "eps"):
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction type {prediction!r}")
        self.model = model
        self.prediction = prediction
        self.sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(torch.float32)
        if self.sigmas.device != sigma.device:
            self.sigmas = self.sigmas.to(sigma.device)
        t = sigma_to_t(sigma, self.sigmas)
        s = sigma.view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        c_in = (s**2 + 1) ** -0.5
        out = self.model(x * c_in, t)
        if self.prediction == "eps":
            return x - s * out
        # v-prediction (sigma_data 1): x0 = c_skip * x + c_out * v
        return x / (s**2 + 1) - out * s * c_in
