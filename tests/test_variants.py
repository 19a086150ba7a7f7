"""Every variant equals the official one: parameters, state-dict keys and shapes, pretrained
config and FLOPs (variants.json was recorded from the official implementation)."""
from __future__ import annotations

import pytest
import torch
import timm

import hymamba
from hymamba.apps.flops import count_macs
from hymamba.models.variants import VARIANTS

OFFICIAL = {name: v.official_name for name, v in VARIANTS.items() if v.official_name}


def _meta_model(name: str) -> hymamba.MambaVision:
    with torch.device("meta"):
        return hymamba.create_model(name)


def test_every_official_variant_is_listed(variants_json) -> None:
    assert sorted(OFFICIAL.values()) == sorted(variants_json)
    assert set(OFFICIAL) <= set(hymamba.list_models())


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_state_dict_and_params(name: str, variants_json) -> None:
    ref = variants_json[OFFICIAL[name]]
    model = _meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == ref["params"]
    ours = {k: [list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()}
    assert ours == ref["state_dict"]


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_pretrained_cfg(name: str, variants_json) -> None:
    ref = variants_json[OFFICIAL[name]]["pretrained_cfg"]
    cfg = _meta_model(name).pretrained_cfg
    for key, value in ref.items():
        ours = cfg[key]
        assert (list(ours) if isinstance(ours, (tuple, list)) else ours) == value, key
    assert cfg["url"].startswith("https://huggingface.co/nvidia/")


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_flops_match_fvcore(name: str, variants_json) -> None:
    ref = variants_json[OFFICIAL[name]]["fvcore_gmacs_at_input_size"]
    model = _meta_model(name)
    macs, by_op = count_macs(model, tuple(model.pretrained_cfg["input_size"]))
    assert macs > 0 and set(by_op) >= {"conv2d", "linear", "batch_norm", "layer_norm", "MambaVisionMixer"}
    if ref is None:  # the official run recorded no count for L3
        pytest.skip("no official FLOPs recorded for this variant")
    assert round(macs / 1e9, 2) == ref


@pytest.mark.parametrize("official,name", [("mamba_vision_T", "mambavision_t"), ("mamba_vision_L2_512_21k",
                                                                                 "mambavision_l2_512_21k"),
                                           ("MambaVision-T", "mambavision_t")])
def test_official_names_are_aliases(official: str, name: str) -> None:
    assert hymamba.resolve_model_name(official) == name


def test_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match="mambavision_t"):
        hymamba.create_model("mambavision_xxl")


def test_registered_with_timm() -> None:
    for name in VARIANTS:
        assert timm.is_model(name)
    model = timm.create_model("test_mambavision", num_classes=5)
    assert isinstance(model, hymamba.MambaVision) and model.num_classes == 5


def test_attention_in_last_half() -> None:
    from hymamba.models.layers import Attention
    from hymamba.models.options import attention_block_indices

    assert attention_block_indices(8) == [4, 5, 6, 7]
    assert attention_block_indices(5) == [3, 4]
    assert attention_block_indices(1) == []
    model = _meta_model("mambavision_t")
    kinds = [type(b.mixer).__name__ for b in model.levels[2].blocks]
    assert kinds == ["MambaVisionMixer"] * 4 + ["Attention"] * 4
    assert isinstance(model.levels[3].blocks[3].mixer, Attention)


def test_bad_config_errors() -> None:
    with pytest.raises(ValueError, match="4 levels"):
        hymamba.MambaVision(16, 8, [1, 1, 1], [8, 8, 4, 2], 4, [1, 2, 2, 4])
    with pytest.raises(TypeError, match="unexpected"):
        hymamba.MambaVision(16, 8, [1, 1, 1, 1], [8, 8, 4, 2], 4, [1, 2, 2, 4], windw=3)
    with pytest.raises(ValueError, match="divisible"):
        hymamba.MambaVision(16, 8, [1, 1, 2, 2], [8, 8, 4, 2], 4, [1, 2, 3, 4])
