"""llem-server's command line: flags that would make wrong numbers are refused before start."""
from __future__ import annotations

import pytest
from llem_server.cli import build_parser


@pytest.mark.parametrize("spec,why", [("0,0", "each GPU once"), ("1, 1", "each GPU once"),
                                      ("0,x", "CUDA indices"), ("", "CUDA indices"), ("-1", "CUDA indices")])
def test_devices_refuses_a_gpu_twice_and_what_is_not_an_index(spec, why, capsys):
    # One GPU twice would be two workers on it, each timing its energy windows as if alone.
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--devices", spec])
    assert why in capsys.readouterr().err


def test_devices_accepts_auto_cpu_and_distinct_indices():
    assert [build_parser().parse_args(["--devices", s]).devices for s in ("auto", "cpu", "1,0", " 2")] == \
        ["auto", "cpu", "1,0", "2"]
