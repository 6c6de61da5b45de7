"""The one place that makes basicsr 1.4.2 importable with current torchvision.

basicsr 1.4.2 (``basicsr/data/degradations.py``) does
``from torchvision.transforms.functional_tensor import rgb_to_grayscale``; that private module was removed
from torchvision (0.17+). ``torchvision.transforms.functional.rgb_to_grayscale`` accepts tensors with the
same signature ``(img, num_output_channels=1)``, so aliasing the old module name to the public module is
enough. Importing this module installs the alias (idempotent); import it before any ``basicsr`` module::

    import medsr_dist.compat  # noqa: F401  (must precede basicsr)
    from basicsr.archs.rrdbnet_arch import RRDBNet

or call :func:`import_basicsr` which does both and returns the package.

Cost, measured on the 2-core CPU dev box (torch 2.14.1, torchvision 0.29.1, basicsr 1.4.2): importing *any*
basicsr submodule (``basicsr.archs.rrdbnet_arch``, ``basicsr.metrics.psnr_ssim``) runs ``basicsr/__init__``,
which imports every subpackage (archs, data, losses, metrics, models, ops, test, train, utils): about 1.4 s
on top of torch (~2 s) and torchvision (~1.7 s). Most of it is ``basicsr.data.degradations`` (1.2 s, via
``scipy.stats``). Nothing fails and nothing is written to disk. ``basicsr/metrics/niqe.py`` imports from
``scipy.ndimage.filters``, deprecated and due to disappear in SciPy 2.0 (which will break ``import basicsr``
and need a second alias here); this module silences that one DeprecationWarning by message.
``ray`` and ``skimage`` are not pulled in.
So: keep basicsr imports inside the modules that need them (archs, metrics), never in package ``__init__``
files, so that ``import medsr_dist`` stays cheap.
"""
from __future__ import annotations

import sys
import types
import warnings

_OLD_FUNCTIONAL_TENSOR = "torchvision.transforms.functional_tensor"


def install_torchvision_alias() -> None:
    """Alias ``torchvision.transforms.functional_tensor`` to ``torchvision.transforms.functional``.

    Idempotent; leaves an existing module of that name alone (a torchvision that still ships it).
    """
    if _OLD_FUNCTIONAL_TENSOR in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401  (old torchvision: nothing to do)
    except ImportError:
        import torchvision.transforms.functional as functional

        sys.modules[_OLD_FUNCTIONAL_TENSOR] = functional


def import_basicsr() -> types.ModuleType:
    """Install the alias and import the ``basicsr`` package (about 1.4 s the first time; cached after).

    Returns:
        The ``basicsr`` module.
    """
    install_torchvision_alias()
    import basicsr

    return basicsr


install_torchvision_alias()
# Known and harmless until SciPy 2.0 (see the module docstring); matched by message so nothing else is hidden.
warnings.filterwarnings(
    "ignore", message=r"Please import `convolve` from the `scipy\.ndimage` namespace", category=DeprecationWarning
)
