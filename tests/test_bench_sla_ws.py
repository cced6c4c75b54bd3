"""bench/sla_ws.py (run by hand on a Hopper card) refuses bad arguments and a machine without Hopper before any
work."""

import pytest
import torch
from helpers import bench_module


def _bench():
    return bench_module("sla_ws")


@pytest.mark.parametrize("argv,message", [
    (["--topk", "0"], "not a fraction of the key blocks"),
    (["--topk", "1.5"], "not a fraction of the key blocks"),
    (["--reps", "0"], "give at least 1"),
    (["--res", "1080p"], "invalid choice"),
])
def test_bad_arguments_are_refused_naming_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit):
        _bench().parse_args(argv)
    assert message in capsys.readouterr().err


def test_defaults_time_both_resolutions_at_topk_0_1():
    args = _bench().parse_args([])
    assert args.res == ["720p", "480p"] and args.topk == 0.1 and args.reps == 10


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0),
                    reason="runs the benchmark on this Hopper card")
def test_without_a_hopper_card_it_stops_with_the_reason():
    with pytest.raises(SystemExit, match="needs a Hopper GPU"):
        _bench().main(["--res", "480p"])
