"""Networks and bundles: offline ImageNet Lite0, three layer groups, safetensors + JSON only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HAM10000, noise_image
from PIL import Image

from dermaclass import models
from dermaclass.models import ModelError


def _real_image() -> Image.Image:
    path = HAM10000 / "images" / "ISIC_0024306.jpg"
    return Image.open(path).convert("RGB") if path.is_file() else noise_image(0, (200, 150))


@pytest.mark.parametrize("n", [0, 1, 2])
def test_lite_matches_reference_package_logits(n: int) -> None:
    efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch", reason="test extra not installed")
    arch = f"tf_efficientnet_lite{n}"
    ours = models.create_body(arch, pretrained=True, num_classes=1000).eval()
    ref = efficientnet_lite_pytorch.EfficientNet.from_pretrained(
        f"efficientnet-lite{n}", weights_path=str(models.lite_weights_path(arch))
    ).eval()
    # the reference pads statically for its native resolution; timm pads for whatever comes in
    side = (224, 240, 260)[n]
    x = torch.from_numpy(np.asarray(_real_image().resize((side, side)), dtype=np.float32)).permute(2, 0, 1)[None]
    norm = models.normalization(arch)
    assert norm == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    x = (x / 255 - 0.5) / 0.5
    with torch.no_grad():
        a, b = ours(x), ref(x)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert a.argmax() == b.argmax()


def test_splitter_has_three_groups_covering_every_parameter() -> None:
    for arch in ("tf_efficientnet_lite0", "resnet18"):
        net = models.build_model(arch, 7, pretrained=False)
        groups = models.splitter(net)
        assert len(groups) == 3 and all(groups)
        ids = [id(p) for g in groups for p in g]
        assert len(ids) == len(set(ids)) == len(list(net.parameters()))
        assert {id(p) for p in net[1].parameters()} == {id(p) for p in groups[2]}


def test_unknown_arch_and_offline_download_are_clear(monkeypatch) -> None:
    with pytest.raises(ModelError, match="unknown architecture 'resnet_nope'"):
        models.create_body("resnet_nope", pretrained=False)
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("could not connect to huggingface.co")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelError, match="cannot download ImageNet weights for 'resnet18'.*--weights PATH"):
        models.create_body("resnet18", pretrained=True)


def test_local_weights_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = models.create_body("resnet18", pretrained=False)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        body = models.create_body("resnet18", pretrained=False, weights=tmp_path / f)
        torch.testing.assert_close(body.conv1.weight, src.conv1.weight)
    with pytest.raises(ModelError, match="only 0 of"):
        models.create_body("tf_efficientnet_lite0", pretrained=False, weights=tmp_path / "w.safetensors")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="bad.pth: cannot read weights"):
        models.create_body("resnet18", pretrained=False, weights=tmp_path / "bad.pth")


def test_bundle_round_trip_and_no_silent_overwrite(tmp_path: Path) -> None:
    net = models.build_model("resnet18", 3, pretrained=False).eval()
    meta = models.BundleMeta(
        arch="resnet18", classes=("a", "b", "c"), input_size=(32, 24), normalization=models.normalization("resnet18")
    )
    models.save_bundle(net, meta, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["model.json", "model.safetensors"]
    loaded, back = models.load_bundle(tmp_path / "b")
    x = torch.randn(2, 3, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    assert back.classes == ("a", "b", "c") and back == meta.with_(weights_sha256=back.weights_sha256)
    with pytest.raises(FileExistsError):
        models.save_bundle(net, meta, tmp_path / "b")
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var[0] = 1e5  # above float16's range: kept in float32, not turned into Inf
    models.save_bundle(net, meta, tmp_path / "b", force=True, dtype=torch.float16)
    half, _ = models.load_bundle(tmp_path / "b")
    assert next(half.parameters()).dtype == torch.float32  # stored as float16, served as float32
    with torch.no_grad():
        torch.testing.assert_close(half(x), net(x), atol=2e-2, rtol=2e-2)


def test_bad_bundles(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a model bundle"):
        models.load_bundle(tmp_path)
    (tmp_path / "model.json").write_text('{"arch": "resnet18"}')
    with pytest.raises(ModelError, match="lacks classes"):
        models.load_bundle(tmp_path)


@pytest.fixture()
def small_bundle(tmp_path: Path) -> Path:
    net = models.build_model("test_resnet", 3, pretrained=False).eval()
    meta = models.BundleMeta(
        arch="test_resnet",
        classes=("a", "b", "c"),
        input_size=(32, 24),
        normalization=models.normalization("test_resnet"),
        calibration={"temperature": 1.5, "refer": {"min_top_probability": 0.5, "ood": {"threshold": -3.0}}},
        operating_points={"a": {"threshold": 0.2}},
        tta="flips4",
    )
    return models.save_bundle(net, meta, tmp_path / "b")


def _edit(bundle: Path, change) -> None:  # noqa: ANN001 - change(meta) -> meta
    import json

    path = bundle / "model.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda m: 5, "JSON object"),
        (lambda m: None, "JSON object"),
        (lambda m: "hello", "JSON object"),
        (lambda m: {**m, "head": []}, "head"),
        (lambda m: {**m, "normalization": {"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2]}}, "normalization.mean"),
        (
            lambda m: {**m, "normalization": {**m["normalization"], "std": [0.2, 0.0, 0.2]}},
            "normalization.std is \\[0.2, 0.0, 0.2\\]",
        ),
        (lambda m: {**m, "input_size": [-128, 96]}, "input_size"),
        (lambda m: {**m, "input_size": [0, 0]}, "input_size"),
        (lambda m: {**m, "input_size": "ab"}, "input_size"),
        (lambda m: {**m, "input_size": [128]}, "input_size"),
        (lambda m: {**m, "input_size": [20000, 20000]}, "input_size"),
        (lambda m: {**m, "calibration": {"temperature": "hot"}}, "temperature"),
        (lambda m: {**m, "calibration": {"temperature": 0}}, "temperature"),
        (lambda m: {**m, "calibration": {"temperature": -1.0}}, "temperature"),
        (lambda m: {**m, "operating_points": {"a": {"threshold": "high"}}}, "threshold"),
        (lambda m: {**m, "classes": ["a", "a", "b"]}, "classes"),
        (lambda m: {**m, "format": 99}, "newer"),
        (lambda m: {**m, "tta": "rotate"}, "tta"),
        (lambda m: {**m, "calibration": {"refer": {"ood": {"method": "odin", "threshold": 1.0}}}}, "ood.method"),
        (lambda m: {**m, "ensemble": {"combine": "median of logits"}}, "ensemble.combine"),
        (lambda m: {**m, "ensemble": []}, "ensemble must be an object"),
    ],
)
def test_malformed_metadata_is_refused_with_exit_4(small_bundle: Path, change, problem: str) -> None:
    _edit(small_bundle, change)
    with pytest.raises(ModelError, match=problem) as info:
        models.load_bundle(small_bundle)
    assert info.value.exit_code == 4 and "model.json" in str(info.value)


def test_non_finite_json_numbers_and_deep_nesting_are_refused(small_bundle: Path) -> None:
    text = (small_bundle / "model.json").read_text()
    (small_bundle / "model.json").write_text(text.replace('"temperature": 1.5', '"temperature": NaN'))
    with pytest.raises(ModelError, match="temperature"):
        models.load_bundle(small_bundle)
    (small_bundle / "model.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelError, match="unreadable"):
        models.load_bundle(small_bundle)


def test_nan_or_integer_weights_and_torn_bundles_are_refused(small_bundle: Path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    state = load_file(str(small_bundle / "model.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    meta = json.loads((small_bundle / "model.json").read_text())
    poisoned = {**state, key: torch.full_like(state[key], float("nan"))}
    save_file(poisoned, str(small_bundle / "model.safetensors"))
    with pytest.raises(ModelError, match="sha256"):  # new weights beside the old metadata: torn
        models.load_bundle(small_bundle)
    _edit(small_bundle, lambda m: {k: v for k, v in m.items() if k != "weights_sha256"})
    with pytest.raises(ModelError, match="NaN or Inf"):
        models.load_bundle(small_bundle)
    save_file({**state, key: state[key].to(torch.int8)}, str(small_bundle / "model.safetensors"))
    with pytest.raises(ModelError, match="not floating point"):
        models.load_bundle(small_bundle)
    assert len(meta["weights_sha256"]) == 64


def test_an_architecture_that_does_not_fit_the_weights_is_refused_before_building(small_bundle: Path) -> None:
    # built on the meta device and compared with the file's header: never allocated (it took 25 s and 3.4 GB)
    _edit(small_bundle, lambda m: {**m, "arch": "vit_huge_patch14_224", "weights_sha256": None})
    with pytest.raises(ModelError, match=r"do not fit vit_huge_patch14_224 .*631,\d{3},\d{3} in the architecture"):
        models.load_bundle(small_bundle)


def test_feature_layer_is_the_block_before_the_last_and_the_tap_is_one_hook() -> None:
    from dermaclass.models import WithFeatures, feature_layer

    model = models.build_model(models.DEFAULT_ARCH, 7, pretrained=False)
    assert feature_layer(model) == "blocks.5"
    net = WithFeatures(model).eval()
    target = model[0].model.get_submodule("blocks.5")
    assert len(target._forward_hooks) == 1
    with torch.no_grad():
        out = net(torch.randn(2, 3, 96, 128))
    assert out.shape == (2, 7 + 192)  # logits, then the 192 pooled channels of blocks.5
    logits, feats = WithFeatures(model, split=True, layer=None)(torch.randn(1, 3, 96, 128))
    assert feats.shape == (1, 1280)  # layer None: the body's own output, pooled
    net.close()
    assert len(target._forward_hooks) == 0  # closed; the layer=None tap hooks nothing


def test_a_class_list_that_does_not_fit_the_weights_names_the_field(small_bundle: Path) -> None:
    _edit(small_bundle, lambda m: {**m, "classes": ["a", "b", "c", "d"], "weights_sha256": None})
    with pytest.raises(
        ModelError, match=r"model.json: classes lists 4 classes but the weights' output layer has 3"
    ) as info:
        models.load_bundle(small_bundle)
    assert info.value.exit_code == 4


def test_bundle_meta_round_trips_and_keeps_keys_it_does_not_know(small_bundle: Path) -> None:
    import json

    _edit(small_bundle, lambda m: {**m, "note_from_a_newer_minor_version": {"x": 1}})
    meta = models.read_bundle_meta(small_bundle)
    assert meta.extra == {"note_from_a_newer_minor_version": {"x": 1}}
    assert meta.to_dict() == json.loads((small_bundle / "model.json").read_text())
    assert meta.temperature == 1.5 and meta.ood == {"threshold": -3.0} and meta.n_classes == 3
    assert meta.names == {"a": "a", "b": "b", "c": "c"}  # no class names recorded: the codes
    models.write_bundle_meta(small_bundle, meta.with_(calibration={"temperature": 2.0}))
    assert models.load_bundle(small_bundle)[1].temperature == 2.0  # the weights' sha256 still matches


def test_every_bundle_in_the_repository_loads_through_the_records() -> None:
    from dermaclass.evaluate.record import read_report

    root = Path(__file__).resolve().parents[1] / "models"
    bundles = [p.parent for p in root.glob("*/model.json")]
    assert bundles, "the repository ships a model bundle"
    for bundle in bundles:
        meta = models.read_bundle_meta(bundle)
        assert meta.format <= models.BUNDLE_FORMAT and meta.n_classes >= 2
        for report in bundle.glob("**/report.json"):
            assert read_report(report).classes == meta.classes


def test_tta_modes_and_settings_map_both_ways() -> None:
    """model.json ``tta`` against the config's ``tta`` (and the CLI's mode names); the training
    views (fastai flips) are the Predictor's views in the same order."""
    from dermaclass.errors import ConfigError
    from dermaclass.serving.predictor import TTA_VIEWS
    from dermaclass.train.callbacks import FLIPS

    assert [models.tta_mode(v) for v in ("none", "flips", "flips2", "flips4")] == [None, "flips4", "flips2", "flips4"]
    assert [models.tta_setting(m) for m in models.TTA_MODES] == ["none", "flips2", "flips"]
    with pytest.raises(ConfigError, match="flips2 or flips4"):
        models.tta_mode("rotate")
    assert set(FLIPS) == set(TTA_VIEWS) == {m for m in models.TTA_MODES if m}
    im = np.arange(24).reshape(2, 4, 3)
    for mode, dims in FLIPS.items():  # numpy (H, W, C) views against torch (N, C, H, W) flip dims
        expected = [np.flip(im, axis=tuple(d - 2 for d in ds)) if ds else im for ds in dims]
        assert all(np.array_equal(v(im), e) for v, e in zip(TTA_VIEWS[mode], expected, strict=True))
