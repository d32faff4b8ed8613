"""ui.app: the launched Gradio app, driven by gradio_client (diagnose, refuse, save corrections)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from conftest import free_port
from PIL import Image

from dermaclass import DISCLAIMER
from dermaclass.ui import build_app


def test_launched_app_diagnoses_refuses_and_saves_corrections(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    from gradio_client import Client, handle_file

    port = free_port()
    from dermaclass.ui import DELETE_CACHE

    app = build_app(tiny_bundle, review_dir=tmp_path / "review")
    assert app.delete_cache == DELETE_CACHE  # uploads (patients' images) do not stay in Gradio's cache
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        label, overlay, verdict, *_ = client.predict(
            handle_file(str(colour_data / "mel" / "4.png")), False, api_name="/diagnose"
        )
        assert label["label"] in {"benign keratosis-like lesion (bkl)", "melanoma (mel)", "melanocytic nevus (nv)"}
        assert DISCLAIMER in verdict and overlay is not None
        msg = client.predict("nv", "second opinion", "L-17", api_name="/correct")
        assert msg.startswith("Saved") and (tmp_path / "review" / "labels.csv").is_file()
        # The server limits the note whatever the browser sends (a 1 MB note broke the manifest).
        msg = client.predict("mel", "x" * 5000, "", api_name="/correct")
        assert msg.startswith("Not saved") and "note" in msg
        msg = client.predict("nv", "line one\rline two", "L-17", api_name="/correct")  # a bare CR split the row once
        assert msg.startswith("Saved")
        # A new image resets the correction form: no stale label, note or lesion id.
        out = client.predict(handle_file(str(colour_data / "nv" / "3.png")), False, api_name="/diagnose")
        values = [v.get("value") if isinstance(v, dict) else v for v in out[-4:]]
        assert values == [None, "", "", ""]
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"\x89PNG garbage")
        _, _, verdict, *_ = client.predict(handle_file(str(bad)), False, api_name="/diagnose")
        assert "bad.png: not a readable image" in verdict
        dot = tmp_path / "dot.png"
        Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(dot)
        label, _, verdict, *_ = client.predict(handle_file(str(dot)), False, api_name="/diagnose")
        assert not label and "too small to judge: the image is 1x1 pixels" in verdict
    finally:
        app.close()
    table = pd.read_csv(tmp_path / "review" / "labels.csv", dtype=str)
    assert table["label"].tolist() == ["nv"] and table["note"].tolist() == ["line one\nline two"]
    assert table["original_name"].tolist() == ["4.png"] and table["lesion"].tolist() == ["L-17"]
