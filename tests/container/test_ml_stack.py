"""The loaders people use, offline, with every torch.load routed through the sandbox
(``patch_torch``): transformers (a ``.bin`` and a sharded ``.bin`` directory), diffusers (a real
``UNet2DModel`` from a tiny config, saved as ``.bin``), a Lightning-style checkpoint, and
``nn.Module.load_state_dict(torch.load(...))``. The results equal the
originals and each load went through ``safe_load``; a hostile variant raises and leaves no
marker. The sharded directory, converted by a batch, loads with ``from_pretrained`` too."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import sandbox
from sandbox import _api
from tests import checkpoints as ck

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths safe_load was called with (the patch calls the module-level function)."""
    seen: list[str] = []
    real = _api.safe_load

    def counting(f: Any, *args: Any, **kw: Any) -> Any:
        seen.append(os.fspath(f) if isinstance(f, (str, os.PathLike)) else "<file object>")
        return real(f, *args, **kw)

    monkeypatch.setattr(_api, "safe_load", counting)
    return seen


def tiny_gpt2() -> Any:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def same_weights(a: Any, b: Any) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def bin_dir(model: Any, path: Path, shards: int = 1) -> Path:
    """A checkpoint directory in the legacy .bin layout (one file, or shards plus an index)."""
    model.config.save_pretrained(path)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(sd, path / "pytorch_model.bin")
        return path
    names = sorted(sd)
    per = -(-len(names) // shards)
    wmap = {}
    for i in range(shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i * per : (i + 1) * per]
        torch.save({k: sd[k] for k in part}, path / shard)
        wmap.update({k: shard for k in part})
    (path / "pytorch_model.bin.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                "weight_map": wmap,
            }
        )
    )
    return path


@pytest.mark.parametrize("shards", [1, 3])
def test_transformers_from_pretrained_goes_through_the_sandbox(
    tmp_path: Path, calls: list[str], shards: int
) -> None:
    model = tiny_gpt2()
    path = bin_dir(model, tmp_path / "gpt2", shards)
    with sandbox.patch_torch():
        loaded = transformers.GPT2LMHeadModel.from_pretrained(path)
    assert same_weights(model, loaded)
    # every shard went through the sandbox (transformers may read one twice)
    assert {Path(c).name for c in calls} == {p.name for p in path.glob("*.bin")}
    assert len({Path(c).name for c in calls}) == shards


def test_a_hostile_bin_raises_in_from_pretrained(tmp_path: Path) -> None:
    model = tiny_gpt2()
    path = bin_dir(model, tmp_path / "gpt2")
    marker = tmp_path / "marker"
    sd = dict(model.state_dict())
    sd["payload"] = ck.Reduce(os.system, f"touch {marker}")  # type: ignore[assignment]
    torch.save(sd, path / "pytorch_model.bin")
    with sandbox.patch_torch(), pytest.raises(sandbox.SandboxViolation):
        transformers.GPT2LMHeadModel.from_pretrained(path)
    assert not marker.exists()


def test_a_converted_sharded_directory_loads_with_from_pretrained(tmp_path: Path) -> None:
    from sandbox._batch import BatchOptions, run_batch

    model = tiny_gpt2()
    src = bin_dir(model, tmp_path / "src", shards=3)
    out = tmp_path / "out"
    summary = run_batch([src], out, BatchOptions(jobs=2))
    assert summary.exit_code == 0 and summary.indexes == ["model.safetensors.index.json"]
    assert not list(out.glob("*.bin"))
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out, use_safetensors=True)
    assert same_weights(model, loaded)


def test_lightning_style_checkpoint_and_load_state_dict(tmp_path: Path, calls: list[str]) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    ckpt: dict[str, Any] = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
        "hyper_parameters": {"lr": 1e-3, "hidden": 8, "act": "relu"},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
        "callbacks": {},
    }
    path = ck.save(ckpt, tmp_path / "last.ckpt")
    plain = ck.save(net.state_dict(), tmp_path / "net.pt")
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with sandbox.patch_torch():
        got = torch.load(path, map_location="cpu")
        fresh.load_state_dict(torch.load(plain))
    assert got["hyper_parameters"] == ckpt["hyper_parameters"] and got["global_step"] == 120
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v)
    state = got["optimizer_states"][0]["state"]
    assert torch.equal(state[0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert same_weights(net, fresh)
    assert calls == [str(path), str(plain)]


def tiny_unet() -> Any:
    """A real diffusers model class from a tiny config (a few thousand parameters)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


def _chain(exc: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def test_diffusers_from_pretrained_goes_through_the_sandbox(tmp_path: Path, calls: list[str]) -> None:
    diffusers = pytest.importorskip("diffusers")
    model = tiny_unet()
    model.save_pretrained(tmp_path / "unet", safe_serialization=False)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.bin"
    assert weights.is_file() and not list((tmp_path / "unet").glob("*.safetensors"))
    with sandbox.patch_torch():
        loaded = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet", use_safetensors=False)
    assert same_weights(model, loaded)
    assert [Path(c).name for c in calls] == [weights.name]
    # the sandbox's own report of the same file: a clean torch zip whose tensors all came back
    report = sandbox.scan(weights)
    assert report.verdict is sandbox.Verdict.CLEAN and report.format == "torch-zip"
    assert report.tensors == len(model.state_dict())


def test_a_hostile_bin_raises_in_diffusers_from_pretrained(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    model = tiny_unet()
    model.save_pretrained(tmp_path / "unet", safe_serialization=False)
    marker = tmp_path / "marker"
    sd: dict[str, Any] = dict(model.state_dict())
    sd["payload"] = ck.Reduce(os.system, f"touch {marker}")
    torch.save(sd, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with sandbox.patch_torch(), pytest.raises(OSError) as info:
        diffusers.UNet2DModel.from_pretrained(tmp_path / "unet", use_safetensors=False)
    # diffusers' load_state_dict turns whatever torch.load raised into its own OSError
    # ("Unable to load weights ..."): ours is in the chain, with its report
    violations = [e for e in _chain(info.value) if isinstance(e, sandbox.SandboxViolation)]
    assert violations, repr(info.value)
    assert violations[0].report is not None and violations[0].report.verdict.value == "malicious"
    assert not marker.exists()
