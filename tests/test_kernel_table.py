"""`dispatch: auto` follows this machine's measured table (vitmoe.moe.kernel_table), which
`vitmoe bench` writes from timings of a run's own layer shapes."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import TINY_SETS

from vitmoe.cli.main import main
from vitmoe.moe import MoEMlp
from vitmoe.moe import kernel_table as kt
from vitmoe.moe.experts import GroupedExperts


@pytest.fixture(autouse=True)
def _own_table(tmp_path, monkeypatch):
    monkeypatch.setenv("VITMOE_CACHE", str(tmp_path / "cache"))
    kt._table.cache_clear()
    yield
    kt._table.cache_clear()


def test_shape_keys_round_rows_up_to_a_power_of_two():
    assert kt.shape_key("cpu", torch.bfloat16, 300, 1024, 16, 260) == "cpu/bfloat16/D300/H1024/E16/R512"
    assert kt.shape_key("cuda", torch.float32, 64, 128, 8, 256) == "cuda/float32/D64/H128/E8/R256"
    assert kt.shape_key("cpu", torch.float32, 64, 128, 8, 1) == "cpu/float32/D64/H128/E8/R1"


def _layers():
    torch.manual_seed(0)
    auto = MoEMlp(24, 40, num_experts=4, router="topk", top_k=2, expert_init="independent")
    grouped = MoEMlp(24, 40, num_experts=4, router="topk", top_k=2, dispatch="grouped")
    grouped.load_state_dict(auto.state_dict())
    return auto, grouped


def test_auto_takes_the_measured_path_and_computes_the_same(monkeypatch):
    auto, grouped = _layers()
    x = torch.randn(3, 10, 24)
    calls = []
    padded = GroupedExperts._padded
    monkeypatch.setattr(GroupedExperts, "_padded", lambda self, *a: calls.append(1) or padded(self, *a))
    y_ref = grouped(x)
    auto(x)  # no table: grouped, as before
    assert calls == [] and auto.experts.last_shape_key == "cpu/float32/D24/H40/E4/R16"  # 60 copies / 4 experts
    kt.record({auto.experts.last_shape_key: "padded"})
    assert json.loads(kt.table_path().read_text()) == {"cpu/float32/D24/H40/E4/R16": "padded"}
    y = auto(x)
    assert calls == [1]
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    auto(torch.randn(40, 10, 24))  # another row count: another key, not in the table
    assert calls == [1]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"cpu/float32/D24/H40/E4/R16": "loop"}),
                                     json.dumps(["padded"])])
def test_a_bad_table_is_ignored_with_one_warning(content):
    kt.table_path().parent.mkdir(parents=True)
    kt.table_path().write_text(content)
    auto, _ = _layers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto(torch.randn(3, 10, 24))
        auto(torch.randn(3, 10, 24))
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "ignoring the measured dispatch table" in msgs[0] and str(kt.table_path()) in msgs[0]


def test_bench_command_measures_a_runs_shapes_and_writes_the_table(capsys):
    args = ["bench", "--set", "model=switch_vit", "--set", "dataset=digits", "--set", "batch_size=32",
            *[a for a in TINY_SETS], "--device", "cpu", "--repeats", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    table = json.loads(kt.table_path().read_text())
    assert len(table) == 1 and set(table.values()) <= {"grouped", "padded"}
    (key,) = table
    assert key.startswith("cpu/float32/D16/") and key in out and "wrote " in out
    # --dry-run measures and leaves the table alone
    kt.table_path().unlink()
    assert main(args + ["--dry-run"]) == 0
    assert not kt.table_path().exists() and "--dry-run: the table is unchanged" in capsys.readouterr().out


def test_bench_of_a_dense_model_is_one_line(capsys):
    assert main(["bench", "--set", "model=vit", "--set", "dataset=digits", *TINY_SETS, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vitmoe: error: model vit has no routed expert layer")


def test_the_table_is_not_read_under_compile_or_when_experts_are_split(monkeypatch):
    """Under torch.compile (reading it would break the graph) and with expert parallelism (a rank's
    share and rows follow the routing) auto takes the grouped path whatever the table says."""
    auto, _ = _layers()
    kt.record({"cpu/float32/D24/H40/E4/R16": "padded", "cpu/bfloat16/D24/H40/E4/R16": "padded"})
    x = torch.randn(60, 24, dtype=torch.bfloat16)  # grouped_mm runs bf16 under compile too
    assert auto.experts._uses_grouped(x) is False
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert auto.experts._uses_grouped(x) is True
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(type(auto.experts), "sharded", property(lambda self: True))
    assert auto.experts._uses_grouped(x) is True
