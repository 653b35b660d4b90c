"""Import k-diffusion's `sampling` and `external` modules as a test reference.

`import k_diffusion` runs the package __init__, which imports its training and evaluation code
(torchvision, clean-fid, CLIP, ...), none of which is installed. The two modules we compare against need
only `k_diffusion.utils`, whose one unmet import is `torchvision.transforms.functional`, used by image
helpers we never call. So: register a bare package object for `k_diffusion` (its __path__ pointing at
the installed files, so submodules load normally), and a stub torchvision only while importing.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types

_STUBS = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


@functools.cache
def load() -> tuple[types.ModuleType, types.ModuleType]:
    """Return (k_diffusion.sampling, k_diffusion.external)."""
    spec = importlib.util.find_spec("k_diffusion")  # locates the package without running __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (make install puts it in .venv)")
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        package.__file__ = spec.origin
        # Stays registered: the loaded submodules resolve `from . import utils` through it.
        sys.modules["k_diffusion"] = package

    saved = {name: sys.modules.get(name) for name in _STUBS}
    stubs = {name: types.ModuleType(name) for name in _STUBS}
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    sys.modules.update(stubs)
    try:
        sampling = importlib.import_module("k_diffusion.sampling")
        external = importlib.import_module("k_diffusion.external")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return sampling, external


def eps_denoiser(unet):
    """k-diffusion's discrete eps denoiser (SD's scaled-linear schedule) around a diffusers UNet:
    `denoiser(x, sigma, context=...) -> x0`."""
    from diffusers import DDPMScheduler

    _, external = load()
    alphas_cumprod = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod

    class DiffusersUNet(external.DiscreteEpsDDPMDenoiser):
        def get_eps(self, x, t, context):
            return self.inner_model(x, t, encoder_hidden_states=context).sample

    return DiffusersUNet(unet, alphas_cumprod, quantize=False)
