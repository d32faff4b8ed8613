"""Networks and bundles: offline ImageNet Lite0, three layer groups, safetensors + JSON only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import HAM10000, noise_image
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
    meta = {"arch": "resnet18", "classes": ["a", "b", "c"], "input_size": [32, 24],
            "normalization": models.normalization("resnet18")}
    models.save_bundle(net, meta, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["model.json", "model.safetensors"]
    loaded, back = models.load_bundle(tmp_path / "b")
    x = torch.randn(2, 3, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    assert back["classes"] == ["a", "b", "c"]
    with pytest.raises(FileExistsError):
        models.save_bundle(net, meta, tmp_path / "b")
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
