"""data.labels: class full names, and the one label -> class index mapping."""

from __future__ import annotations

import numpy as np
import pytest

from dermaclass.data.labels import class_indices, full_name
from dermaclass.errors import EvaluationError


def test_class_indices_maps_labels_in_the_models_order() -> None:
    assert class_indices(["nv", "mel", "nv", "bkl"], ["bkl", "mel", "nv"], source="x").tolist() == [2, 1, 2, 0]
    assert class_indices(np.array(["mel"]), ("bkl", "mel"), source="x").dtype == np.int64
    assert class_indices([], ["bkl"], source="x").shape == (0,)


def test_class_indices_refuses_unknown_labels_with_their_counts() -> None:
    with pytest.raises(
        EvaluationError,
        match=r"^clinic_b: labels the model does not know: 'bcc' \(2 images\), "
        r"'scc' \(1 image\); the model's classes are bkl, mel\. Relabel",
    ):
        class_indices(["bcc", "mel", "scc", "bcc"], ["bkl", "mel"], source="clinic_b")


def test_full_names_of_known_codes() -> None:
    assert full_name("mel") == "melanoma"
