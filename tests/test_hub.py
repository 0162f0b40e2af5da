"""Hugging Face hub names offline: an unreachable hub is noticed once and weights are then read from the
cache only (no connection attempts, no retries), hints name the `hf` command, a pinned revision reaches
``from_pretrained`` and the fingerprint, and open_clip's ``hf-hub:``/``local-dir:`` names pass through."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import open_clip
import pytest
import torch
import transformers

from zscir.backbones import BackboneLoadError, backbone_fingerprint, build_encoder, errors
from zscir.backbones.hf_clip_encoder import build_hf_clip
from zscir.backbones.open_clip_encoder import TINY_ARCHITECTURES, build_open_clip


@pytest.fixture
def network(monkeypatch):
    """Counts the hub probe's requests (refused: the hub is unreachable) and every other socket connection
    (refused too); no offline mode from the environment; the probe's answer is not cached across tests."""
    calls = {"probe": 0, "connect": 0, "reachable": False}

    def urlopen(request, timeout=None):
        calls["probe"] += 1
        if not calls["reachable"]:
            raise urllib.error.URLError("Network is unreachable")
        return _Answer()

    def connect(self, address):
        calls["connect"] += 1
        raise OSError("Network is unreachable")

    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as if imported without offline mode
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(socket.socket, "connect", connect)
    errors._probe.cache_clear()
    yield calls
    errors._probe.cache_clear()


class _Answer:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """Records the keyword arguments of ``CLIPModel.from_pretrained``, then lets the real one run."""
    calls = []
    real = transformers.CLIPModel.from_pretrained.__func__

    def record(cls, name, **kwargs):
        calls.append(kwargs)
        return real(cls, name, **kwargs)

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", classmethod(record))
    return calls


def test_an_unreachable_hub_is_probed_once_then_only_the_cache_is_read(
    network, from_pretrained_calls, tmp_path
):
    for _ in range(2):
        with pytest.raises(BackboneLoadError) as err:
            build_hf_clip("someone/not-cached-clip", cache_dir=str(tmp_path))
        message = str(err.value)
        assert "the hub could not be reached, so only the cache was read" in message
        assert "hf download someone/not-cached-clip --local-dir not-cached-clip" in message
        assert "huggingface-cli" not in message
    assert network["probe"] == 1  # one check per process, not one per load
    assert network["connect"] == 0  # no connection attempt at all after it, so no retries
    assert [c["local_files_only"] for c in from_pretrained_calls] == [True, True]


def test_offline_mode_reads_the_cache_without_probing(network, from_pretrained_calls, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneLoadError, match="HF_HUB_OFFLINE is set, so the hub was not tried"):
        build_hf_clip("someone/not-cached-clip", cache_dir=str(tmp_path))
    assert network["probe"] == network["connect"] == 0
    assert from_pretrained_calls[0]["local_files_only"] is True


def test_a_reachable_hub_is_used_at_the_pinned_revision(network, monkeypatch):
    network["reachable"] = True
    seen = {}

    def fake(cls, name, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", classmethod(fake))
    with pytest.raises(BackboneLoadError):
        build_encoder("hf_clip", "someone/clip", revision="v1.0")
    assert seen["local_files_only"] is False
    assert seen["revision"] == "v1.0"
    assert network["probe"] == 1


def test_the_fingerprint_includes_a_given_revision_only():
    base = {"name": "hf", "kind": "hf_clip", "model": "someone/clip", "checkpoint": None}
    assert backbone_fingerprint({**base, "revision": None}) == backbone_fingerprint(base)  # ids stay stable
    pinned = backbone_fingerprint({**base, "revision": "abc123"})
    assert pinned != backbone_fingerprint(base)
    assert pinned != backbone_fingerprint({**base, "revision": "def456"})


def test_revision_is_refused_where_it_cannot_apply():
    with pytest.raises(BackboneLoadError, match=r"revision do not apply to kind=open_clip.*hf download"):
        build_encoder("open_clip", "tiny", revision="v1")


def test_open_clip_local_dir_names_pass_through(tmp_path):
    """A model folder with its own open_clip_config.json loads by name, with its weights."""
    arch = TINY_ARCHITECTURES["tiny"]
    source = open_clip.CLIP(**arch)
    folder = tmp_path / "my-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": arch, "preprocess_cfg": {}}))
    torch.save(source.state_dict(), folder / "open_clip_pytorch_model.bin")
    encoder = build_open_clip(f"local-dir:{folder}")
    for key, value in source.state_dict().items():
        assert torch.equal(encoder.model.state_dict()[key], value), key
    ids = encoder.tokenize(["a red square"])
    assert ids.shape == (1, arch["text_cfg"]["context_length"])


def test_open_clip_hf_hub_names_pass_through_and_read_the_cache_when_unreachable(network, monkeypatch):
    seen = {}

    def fake(model, **kwargs):
        from huggingface_hub import constants

        seen["model"], seen["offline"] = model, constants.is_offline_mode()
        raise FileNotFoundError("not in the cache")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake)
    with pytest.raises(BackboneLoadError) as err:
        build_open_clip("hf-hub:someone/my-open-clip")
    assert "unknown open_clip model" not in str(err.value)  # no list_models() gate for hub names
    assert "hf download someone/my-open-clip" in str(err.value)
    assert seen == {"model": "hf-hub:someone/my-open-clip", "offline": True}  # the hub client: cache only
    from huggingface_hub import constants

    assert constants.is_offline_mode() is False  # restored afterwards
    assert network["connect"] == 0
