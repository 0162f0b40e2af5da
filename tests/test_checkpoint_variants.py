"""``backbone.checkpoint`` accepts the common ways a state dict is saved (wrapped under ``state_dict`` or
``model``, a DDP ``module.`` prefix, non-persistent buffers such as the ``position_ids`` older
transformers saved) and still refuses a real architecture mismatch, for every encoder kind."""

import pytest
import torch

from zscir.backbones import BackboneLoadError, build_encoder

KINDS = ["open_clip", "hf_clip", "hf_blip"]


def features(encoder) -> torch.Tensor:
    pixels = torch.randn(
        2, 3, encoder.image_size, encoder.image_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        return torch.cat(
            [encoder.encode_image(pixels), encoder.encode_text(encoder.tokenize(["a red circle"]))]
        )


@pytest.fixture(scope="module", params=KINDS)
def source(request):
    """(kind, an encoder whose weights differ from the seed-0 model the checkpoints are loaded into)."""
    return request.param, build_encoder(kind=request.param, model="tiny", init_seed=1)


def non_persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    persisted = module.state_dict()
    return {name: buf for name, buf in module.named_buffers() if name not in persisted}


def variants(kind: str, model: torch.nn.Module) -> dict[str, object]:
    state = model.state_dict()
    ddp = {"module." + k: v for k, v in state.items()}
    out = {
        "plain": state,
        "state_dict wrapper": {"state_dict": state, "epoch": 3},
        "model wrapper": {"model": state, "optimizer": {}},
        "DDP under state_dict": {"epoch": 1, "name": "run", "state_dict": ddp},
        "DDP plain": ddp,
    }
    if kind != "open_clip":  # transformers < 4.31 saved the position_ids buffers
        extra = non_persistent_buffers(model)
        assert any(k.endswith("position_ids") for k in extra), sorted(extra)
        out["old transformers buffers"] = {**state, **extra}
        out["DDP with buffers"] = {"state_dict": {"module." + k: v for k, v in {**state, **extra}.items()}}
    else:
        extra = non_persistent_buffers(model)
        assert "attn_mask" in extra
        out["with attn_mask"] = {**state, **extra}
    return out


def test_saved_variants_load(source, tmp_path):
    kind, src = source
    expected = features(src)
    assert not torch.allclose(features(build_encoder(kind=kind, model="tiny")), expected, atol=1e-4)
    for name, payload in variants(kind, src.model).items():
        path = tmp_path / (name.replace(" ", "_") + ".pt")
        torch.save(payload, path)
        loaded = build_encoder(kind=kind, model="tiny", checkpoint=str(path))
        torch.testing.assert_close(features(loaded), expected, msg=f"{kind}: {name}")


def test_architecture_mismatch_is_still_refused(source, tmp_path):
    kind, src = source
    state = dict(src.model.state_dict())
    dropped = sorted(state)[0]
    del state[dropped]
    state["head.bogus.weight"] = torch.zeros(3)
    path = tmp_path / "mismatch.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    with pytest.raises(BackboneLoadError, match=r"1 missing keys") as err:
        build_encoder(kind=kind, model="tiny", checkpoint=str(path))
    assert dropped in str(err.value)
    assert "1 unexpected keys" in str(err.value)
    assert "head.bogus.weight" in str(err.value)


def test_partial_prefix_and_wrong_shapes_are_refused(source, tmp_path):
    kind, src = source
    state = dict(src.model.state_dict())
    first = sorted(state)[0]
    partly = {("module." + k if k == first else k): v for k, v in state.items()}  # not a DDP save
    torch.save(partly, tmp_path / "partly.pt")
    with pytest.raises(BackboneLoadError, match=r"1 missing keys.*1 unexpected keys"):
        build_encoder(kind=kind, model="tiny", checkpoint=str(tmp_path / "partly.pt"))
    name, value = next((k, v) for k, v in state.items() if v.dim() == 2)
    torch.save({**state, name: torch.zeros(value.shape[0] + 1, value.shape[1])}, tmp_path / "shape.pt")
    with pytest.raises(BackboneLoadError, match=r"(?s)does not match the architecture.*size mismatch"):
        build_encoder(kind=kind, model="tiny", checkpoint=str(tmp_path / "shape.pt"))
