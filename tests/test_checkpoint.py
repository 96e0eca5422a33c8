"""histodiff.checkpoint: safetensors checkpoints with a COMPLETE marker, optimizer round trip, exports."""

from __future__ import annotations

import json
import os

import pytest
import torch

from histodiff.storage import Store
from histodiff import checkpoint as ckpt
from histodiff import storage


def test_checkpoint_round_trip_and_marker_last(tmp_path):
    d = str(tmp_path / "ck")
    ckpt.save_checkpoint(d, {"model": {"w": torch.arange(6.0).view(2, 3)}}, {"step": 7})
    assert ckpt.is_complete(d)
    tensors, state = ckpt.load_checkpoint(d)
    assert state == {"step": 7}
    assert torch.equal(tensors["model"]["w"], torch.arange(6.0).view(2, 3))
    # The marker is the newest file: a crash before it leaves a directory that never loads.
    mtimes = {n: os.stat(os.path.join(d, n)).st_mtime_ns for n in os.listdir(d)}
    assert mtimes[ckpt.COMPLETE] == max(mtimes.values())


def test_incomplete_checkpoint_is_refused(tmp_path):
    d = str(tmp_path / "ck")
    ckpt.save_checkpoint(d, {"model": {"w": torch.ones(2)}}, {"step": 1})
    os.remove(os.path.join(d, ckpt.COMPLETE))
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.load_checkpoint(d)


def test_optimizer_state_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    tensors, layout = ckpt.optimizer_to_tensors(opt)
    d = str(tmp_path / "ck")
    ckpt.save_checkpoint(d, {"optimizer": tensors}, {"optimizer": layout})
    loaded, state = ckpt.load_checkpoint(d)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt.optimizer_from_tensors(opt2, loaded["optimizer"], json.loads(json.dumps(state["optimizer"])))
    a, b = opt.state_dict(), opt2.state_dict()
    for pid in a["state"]:
        for key, value in a["state"][pid].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][pid][key]))


def test_export_replaces_an_older_export_and_hashes_weights(tmp_path):
    from diffusers import UNet2DModel

    uri = str(tmp_path / "model")
    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32),
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        layers_per_block=1, norm_num_groups=8)
    sha1 = ckpt.export_model(model, uri, {"kind": "denoiser", "step": 1}, Store())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    sha2 = ckpt.export_model(model, uri, {"kind": "denoiser", "step": 2}, Store())
    assert sha1 != sha2 and len(sha2) == 64
    loaded, meta = ckpt.load_exported(UNet2DModel, uri, Store())
    assert meta["step"] == 2 and meta["sha256"] == sha2
    assert torch.equal(next(loaded.parameters()), next(model.parameters()))
    Store().delete(storage.join(uri, ckpt.MODEL_META))
    with pytest.raises(FileNotFoundError, match="missing histodiff.json"):
        ckpt.model_meta(uri, Store())
