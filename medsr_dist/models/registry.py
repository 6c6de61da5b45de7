"""Plug-in registries, BasicSR-style: a name -> object map filled by a decorator in the module that defines the object.

``basicsr.utils.registry.Registry`` has the right idea (``@ARCH_REGISTRY.register()`` beside the class, a config's
``type:`` names it) but importing it runs ``basicsr/__init__``, which imports every arch, model and dataset (torch,
cv2, seconds); so :class:`Registry` is our own, standard-library only, plus *lazy* entries: a name whose module
registers it on first use. That keeps ``medsr config`` and the config checks free of torch and of optional runtimes
(onnxruntime, tensorrt), and still lets them list every name.

Model families known to medsr-dist live in :data:`FAMILIES`. A family is one module implementing
:class:`medsr_dist.models.base.ModelFamily` that registers its object with ``@register_family("name")``, plus one
config section (``medsr_dist.config.FAMILY_SECTIONS``, the discriminated union keyed by ``model.family``), plus one
lazy entry below naming its module. The training loop and the inference side get the object through
:func:`load_family`; the config checks get the names from :func:`family_names` (no torch imported).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one kind (``backend``, ``model family``, ...).

    An object is registered with the decorator :meth:`register` in its own module; :meth:`register_lazy` names
    the module that does so, imported by :meth:`get` on first use. Iterating (``sorted(registry)``, ``in``) covers
    registered and lazy names without importing anything.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._objects: dict[str, T] = {}
        self._lazy: dict[str, str] = {}
        self._descriptions: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers an object (class, factory, instance) under ``name``; returns it unchanged.

        Raises:
            ValueError: ``name`` is already registered to a different object.
        """

        def decorate(obj: T) -> T:
            if self._objects.get(name, obj) is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered to {self._objects[name]!r}")
            self._objects[name] = obj
            return obj

        return decorate

    def register_lazy(self, name: str, module: str, description: str = "") -> None:
        """Declare that importing ``module`` registers ``name`` (for heavy or optional dependencies)."""
        self._lazy[name] = module
        if description:
            self._descriptions[name] = description

    def module_of(self, name: str) -> str | None:
        """The module a lazy entry imports on first use (None for an object registered directly)."""
        return self._lazy.get(name)

    def description(self, name: str) -> str:
        """The one-line description given with a lazy entry ('' when none)."""
        return self._descriptions.get(name, "")

    def get(self, name: str) -> T:
        """The object registered as ``name``, importing its lazy module first when needed.

        Raises:
            KeyError: no such name (or its module did not register it).
            ModuleNotFoundError: the lazy module, or a package it needs, is not installed.
        """
        if name not in self._objects and name in self._lazy:
            importlib.import_module(self._lazy[name])
        try:
            return self._objects[name]
        except KeyError:
            raise KeyError(name) from None

    def names(self) -> list[str]:
        """Every name, registered or lazy, sorted."""
        return sorted(set(self._objects) | set(self._lazy))

    def pop(self, name: str, default: Any = None) -> T | Any:
        """Unregister ``name`` (tests); returns the object, or ``default``."""
        self._lazy.pop(name, None)
        return self._objects.pop(name, default)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._objects or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


#: Model families by ``model.family``: objects satisfying :class:`medsr_dist.models.base.ModelFamily`.
FAMILIES: Registry[Any] = Registry("model family")
register_family = FAMILIES.register

# lazy: each family module imports torch (and diffusers for vae/ldm); it registers itself when imported
FAMILIES.register_lazy(
    "realesrgan", "medsr_dist.models.realesrgan",
    "Real-ESRGAN: RRDBNet + UNetDiscriminatorSN, L1 + perceptual + GAN on second-order degraded pairs",
)
FAMILIES.register_lazy(
    "esrgan", "medsr_dist.models.esrgan",
    "ESRGAN: RRDBNet (MSRResNet for x3) + VGGStyleDiscriminator, relativistic average GAN, bicubic pairs",
)
FAMILIES.register_lazy(
    "srgan", "medsr_dist.models.srgan",
    "SRGAN: MSRResNet + VGGStyleDiscriminator, standard GAN + VGG19 conv5_4 perceptual loss, bicubic pairs",
)
FAMILIES.register_lazy(
    "psnr", "medsr_dist.models.psnr",
    "PSNR-oriented L1 training of an RRDBNet or MSRResNet (first stage of a GAN family via model.pretrained_g)",
)
FAMILIES.register_lazy(
    "vae", "medsr_dist.models.ldm",
    "Latent diffusion stage 1: diffusers AutoencoderKL, L1 + perceptual + KL; exports the latent scale factor",
)
FAMILIES.register_lazy(
    "ldm", "medsr_dist.models.ldm",
    "Latent diffusion SR: frozen VAE + diffusers UNet2DModel on [noisy HR latent, LR latent], DDPM/DDIM/DPM-Solver++",
)


def family_names() -> list[str]:
    """Every model family name, sorted (nothing imported: for config checks)."""
    return FAMILIES.names()


def load_family(name: str):
    """Import and return the family object (a :class:`ModelFamily`) registered under ``name``.

    Raises:
        ValueError: unknown family; the message lists the known ones.
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(family_names())})")
    return FAMILIES.get(name)
