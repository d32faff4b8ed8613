"""dermaclass: a dermoscopic skin-lesion classifier that a clinic retrains on its own data.

Decision support, not a diagnostic device. The package is organised one module per concern:
``config`` (the layered run configuration), ``data`` (reading, validating, splitting and
caching clinic image sets), ``cli`` (the ``dermaclass`` command).
"""

import warnings
from importlib.metadata import PackageNotFoundError, version

# fastai calls torch.jit.script when it is imported (fastai/layers.py) and sets a pandas option
# that pandas 3 deprecates: two warnings on every command that a user can do nothing about.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"The 'mode\.chained_assignment' option is deprecated")

try:
    __version__ = version("dermaclass")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

DISCLAIMER = (
    "dermaclass is decision support for trained clinicians, not a diagnostic device. "
    "Its outputs must not replace a dermatologist's examination."
)
