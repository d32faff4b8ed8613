"""dermaclass: a dermoscopic skin-lesion classifier that a clinic retrains on its own data.

Decision support, not a diagnostic device. The package is organised one concern per module or
subpackage, lowest first (each imports only from those above it; tests/test_imports.py checks
that no import circles back):

- ``errors``, ``fileio``: the error classes and atomic writes;
- ``config``: the one frozen run configuration (defaults < YAML < flags);
- ``schedules``: pure plans (stepwise stages, seed 001; member plans of an ensemble);
- ``data/``: reading, validating, splitting and caching clinic image sets;
- ``models/``: networks (timm bodies, fastai heads, offline ImageNet weights) and bundles
  (safetensors + typed JSON);
- ``evaluate/``: pure metrics, calibration, the report record, a bundle on a split;
- ``serving/``: the Predictor, its backends, referral, class-activation maps, exports, and
  refitting a bundle's calibration;
- ``train/``: fastai recipes (LR range tests, SGDR, differential LRs, stepwise subsets),
  callbacks, resume, ensembles;
- ``retrain``: a clinic's retrain and its comparison with the bundle in use;
- ``tune``: seed 002's TPE search over the recipe (Optuna), on a study database;
- ``report/``: HTML reports, model cards, comparisons;
- ``ui``: the Gradio app; ``cli/``: the ``dermaclass`` command.
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
