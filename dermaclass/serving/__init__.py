"""Serving a bundle: the clinician's side of dermaclass. Imports point one way only, down
this list:

- ``refer``: input checks and out-of-distribution scores, pure functions of images,
  features and logits (Lee et al. 2018; Sun et al. 2022; Liu et al. 2020);
- ``backends``: torch, onnxruntime and OpenVINO runners behind one call, and the export
  file names;
- ``explain``: class-activation maps (pytorch-grad-cam; LayerCAM by default);
- ``predictor``: the ``Predictor``: loads a bundle (one network or an ensemble), preprocesses
  exactly as training did, runs test-time augmentation, calibrates, refers;
- ``export``: writes and checks ONNX, OpenVINO float, int8 (NNCF) and the bfloat16 check;
- ``refit``: fits a finished bundle's calibration and referral rule (the end of training,
  ``dermaclass calibrate`` and ``dermaclass fit-ood``).

This ``__init__`` imports nothing: ``models.meta`` reads ``refer``'s constants, and a
package that imported the ``Predictor`` here would import ``models`` back.

This is decision support, not a diagnostic device.
"""
