"""SubgroupIndexd / CaseIdd and the metadata-routed sliding-window inferer."""

import logging

import pytest
import torch
from monai.data import MetaTensor
from scripts.inferers import SUBGROUP_META_KEY, SubgroupSlidingWindowInferer
from scripts.transforms import CaseIdd, SubgroupIndexd

STAGES = ["T1", "T2", "T3", "T4"]


def test_subgroup_names_map_to_indices_and_unknown(caplog):
    t = SubgroupIndexd("stage", STAGES)
    assert [int(t({"stage": s})["subgroup"]) for s in STAGES] == [0, 1, 2, 3]
    with caplog.at_level(logging.WARNING):
        assert int(t({"stage": "T9"})["subgroup"]) == 4  # not listed -> unknown index len(subgroups)
        assert int(t({"stage": "T9"})["subgroup"]) == 4
    assert sum("T9" in r.getMessage() for r in caplog.records) == 1  # warned once per value
    assert int(t({})["subgroup"]) == 4  # missing -> unknown
    assert int(t({"stage": None})["subgroup"]) == 4
    assert t({"stage": "T2"})["subgroup"].dtype == torch.int64
    assert int(SubgroupIndexd("stage", STAGES, default="T3")({})["subgroup"]) == 2
    assert int(SubgroupIndexd("stage", STAGES, case_sensitive=False)({"stage": "t4"})["subgroup"]) == 3


def test_subgroup_index_invalid_lists():
    with pytest.raises(ValueError, match="subgroups"):
        SubgroupIndexd("stage", [])
    with pytest.raises(ValueError, match="repeat"):
        SubgroupIndexd("stage", ["A", "A"])
    with pytest.raises(ValueError, match="subgroups"):
        SubgroupIndexd("stage", "T1")


def test_case_id_from_item_or_file_name():
    assert CaseIdd()({"id": 7, "image": "x.nii.gz"})["id"] == "7"
    assert CaseIdd()({"image": "/data/images/p001.nii.gz"})["id"] == "p001"
    with pytest.raises(ValueError, match="add an 'id'"):
        CaseIdd()({"label": "y"})


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, subgroup=None):
        self.seen.append(None if subgroup is None else subgroup.tolist())
        return x * 1.0


def test_inferer_routes_by_image_metadata_when_caller_passes_no_subgroup():
    image = MetaTensor(torch.rand(1, 8, 8, 8))
    d = SubgroupIndexd("stage", STAGES)({"stage": "T3", "image": image})
    assert d["image"].meta[SUBGROUP_META_KEY] == 2
    inferer = SubgroupSlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=1)
    net = _Recorder()
    inferer(d["image"][None], net)  # MONAI Label / Deploy style: no extra arguments
    assert net.seen == [[2]]
    net.seen.clear()
    inferer(d["image"][None], net, subgroup=torch.tensor([0]))  # an explicit subgroup wins
    assert net.seen == [[0]]
    net.seen.clear()
    inferer(torch.rand(1, 1, 8, 8, 8), net)  # plain tensor, no metadata: unknown routing (None)
    assert net.seen == [None]
