"""sdcli: Stable Diffusion from the command line, with its own networks, samplers and checkpoint loading.

The public API is imported lazily so that `import sdcli` (and `sdcli --help`) does not import torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from sdcli.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'sdcli' has no attribute {name!r}")
