"""Placements and topologies as configuration: checks, files, the simulator's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exegpt.models.defaults import default_model_config
from exegpt.models.stage_spec import LayerRange
from exegpt.placement import Placement, Stage, StagePlacement, placement_from_layout
from exegpt.topology import Topology, format_stage_addresses, parse_stage_addresses

CONFIG = default_model_config()  # T5: 4 encoder and 4 decoder layers


def test_even_split_gives_the_front_stages_the_remainder() -> None:
    placement = Placement.even(CONFIG, 3, tp_degree=2)
    assert [(s.decoder_layers.start, s.decoder_layers.stop) for s in placement.stages] == [
        (0, 2),
        (2, 3),
        (3, 4),
    ]
    assert placement.num_processes == 6


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([((0, 2), (0, 2)), ((3, 4), (2, 4))], "contiguous"),
        ([((0, 4), (0, 3))], "3 of the 4 decoder"),
        ([((0, 4), (0, 4), 3)], "does not divide"),
        ([((0, 0), (0, 0))], "at least one layer"),
    ],
)
def test_bad_placements_are_refused_with_the_reason(stages, message) -> None:
    placement = Placement(
        tuple(StagePlacement(LayerRange(*e), LayerRange(*d), *rest) for e, d, *rest in stages)
    )
    with pytest.raises(ValueError, match=message):
        placement.check(CONFIG)


def test_a_placement_file_round_trips_and_unknown_fields_are_refused(tmp_path: Path) -> None:
    placement = Placement.even(CONFIG, 2)
    assert Placement.from_json(placement.to_json()) == placement
    with pytest.raises(ValueError, match="unknown stage fields"):
        Placement.from_json(json.dumps({"stages": [{"encoder_layers": [0, 4], "gpu": 1}]}))
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"stages": [{"decoder_layers": [0, 4], "encoder_layers": [0, 4],
                                            "tp_degree": 2}]}))  # fmt: skip
    topology = Topology(placement_file=path)
    assert topology.is_pipelined and topology.ranks_per_stage() == [2]
    assert topology.placement(CONFIG).stages[0].tp_degree == 2


def test_the_simulators_layout_becomes_ranges_and_roles() -> None:
    rra = placement_from_layout(
        [Stage((0,), 1, 3, 2), Stage((1, 2), 2, 1, 2)], is_encoder_decoder=True
    )
    assert [(s.encoder_layers, s.decoder_layers, s.tp_degree) for s in rra.stages] == [
        (LayerRange(0, 3), LayerRange(0, 2), 1),
        (LayerRange(3, 4), LayerRange(2, 4), 2),
    ]
    waa = placement_from_layout(
        [Stage((0,), 1, 4, 0), Stage((1,), 1, 0, 4)], is_encoder_decoder=False, num_encode_stages=1
    )
    assert [s.role for s in waa.stages] == ["prefill", "decode"]
    assert waa.prefill_route() == [0] and waa.decoder_route() == [1]


def test_stage_addresses_and_devices() -> None:
    grouped = (("h1:1", "h1:2"), ("h2:3",))
    assert parse_stage_addresses(format_stage_addresses(grouped)) == grouped
    with pytest.raises(ValueError, match="host:port"):
        parse_stage_addresses("h1:1,nope")
    assert Topology(device="cuda").device_of(3) == "cuda:3"
    assert Topology(device="cpu").device_of(3) == "cpu"
    with pytest.raises(ValueError, match="not both"):
        Topology(pipeline_stages=2, placement_file=Path("p.json"))
