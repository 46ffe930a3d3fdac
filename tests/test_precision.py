"""amp "auto": bf16 only where the device computes it natively, float32 elsewhere (a CPU without
AVX-512 BF16 / AMX emulates bf16 matmuls, tens of times slower); a warning when bf16 is asked of
such a device; and YAML 1.2 booleans, so `amp: off` / `--set amp=off` mean the string "off"."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_SETS

from vitmoe.cli.main import main
from vitmoe.readers import parse_yaml, yaml_value
from vitmoe.training import TrainConfig
from vitmoe.training.evaluation import precision
from vitmoe.training.evaluation.precision import amp_note, autocast_context, native_bf16, resolve_amp

CPU = torch.device("cpu")


@pytest.fixture(params=[True, False], ids=["native-bf16", "emulated-bf16"])
def native(request, monkeypatch):
    monkeypatch.setattr(precision, "_native_bf16", lambda device_type, index: request.param)
    return request.param


@pytest.mark.parametrize("avx512_bf16, amx, native", [(False, False, False), (True, False, True), (False, True, True)])
def test_an_x86_cpu_is_native_only_with_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, native):
    # core AVX-512 without the BF16 extension (Skylake to Ice Lake) still converts: oneDNN's own
    # bf16 check says yes there, so it is not what decides on x86
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert precision._native_bf16.__wrapped__("cpu", None) is native


@pytest.mark.parametrize("available, capability, native", [(False, None, False), (True, (7, 5), False),
                                                            (True, (8, 0), True), (True, (9, 0), True)])
def test_a_gpu_is_native_from_ampere_on(monkeypatch, available, capability, native):
    # torch.cuda.is_bf16_supported() says yes on a V100 or T4 too, where bf16 is emulated
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision._native_bf16.__wrapped__("cuda", 0) is native


def test_this_cpu_is_probed_without_error():
    assert native_bf16(CPU) in (True, False)


def test_auto_is_bf16_only_where_native(native):
    assert resolve_amp("auto", CPU) == ("bf16" if native else "off")
    for explicit in ("off", "bf16", "fp16"):
        assert resolve_amp(explicit, CPU) == explicit  # an explicit choice is kept
    a = torch.randn(8, 8)
    with autocast_context("auto", CPU):
        y = a @ a
    assert y.dtype == (torch.bfloat16 if native else torch.float32)


def test_the_log_says_what_auto_chose_and_warns_of_emulated_bf16(native):
    note = amp_note("auto", CPU)
    assert note.startswith("amp auto: bf16" if native else "amp auto: float32")
    warning = amp_note("bf16", CPU)
    if native:
        assert warning is None
    else:
        assert warning.startswith("warning: amp bf16 on this CPU") and "--amp auto or off" in warning
    assert amp_note("off", CPU) is None


@pytest.mark.parametrize("flag", ["auto", "bf16"])
def test_a_run_records_the_precision_it_trained_in(tmp_path, capsys, native, flag):
    run = tmp_path / "run"
    assert main(["train", "--model", "vit", "--dataset", "digits", "--epochs", "1", "--batch", "512", "--amp", flag,
                 "--out", str(run), "--device", "cpu", *TINY_SETS]) == 0
    log = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["amp"] == ("bf16" if native or flag == "bf16" else "off")
    assert ("warning: amp bf16" in log) == (flag == "bf16" and not native)
    assert ("amp auto: " in log) == (flag == "auto")
    # eval takes the run's amp ("auto") and reports what it means here
    assert main(["eval", str(run), "--json", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert r["amp"] == summary["amp"]


def test_yaml_reads_only_true_and_false_as_booleans(tmp_path):
    data = parse_yaml("a: off\nb: on\nc: yes\nd: No\ne: true\nf: FALSE\ng: [off, True]\n", "t")
    assert data == {"a": "off", "b": "on", "c": "yes", "d": "No", "e": True, "f": False, "g": ["off", True]}
    assert yaml_value("off", "--set") == "off" and yaml_value("false", "--set") is False
    # the words YAML 1.1 read as booleans still set a boolean field, and "off" is amp's choice
    (tmp_path / "c.yaml").write_text("model: vit\namp: off\naugment: yes\ntensorboard: off\n")
    cfg = TrainConfig.from_yaml(tmp_path / "c.yaml").validate()
    assert (cfg.amp, cfg.augment, cfg.tensorboard) == ("off", True, False)
    assert TrainConfig().updated({"amp": yaml_value("off", "--set")}).validate().amp == "off"


def test_an_auto_run_is_evaluated_and_grouped_by_the_precision_it_trained_in(tmp_path, capsys, monkeypatch):
    from vitmoe.report.groups import configuration
    from vitmoe.report.runs import load_run

    monkeypatch.setattr(precision, "_native_bf16", lambda device_type, index: True)  # trained where bf16 is native
    runs = {}
    for amp in ("auto", "bf16"):
        runs[amp] = tmp_path / amp
        assert main(["train", "--model", "vit", "--dataset", "digits", "--epochs", "1", "--batch", "512", "--amp", amp,
                     "--out", str(runs[amp]), "--device", "cpu", *TINY_SETS]) == 0
    logged = json.loads((runs["auto"] / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    monkeypatch.setattr(precision, "_native_bf16", lambda device_type, index: False)  # evaluated where it is not
    capsys.readouterr()
    assert main(["eval", str(runs["auto"]), "--json", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert r["amp"] == "bf16" and r["test_acc"] == pytest.approx(logged)
    # the report reads "auto" as what it was (bf16 here): one configuration with the explicit bf16 run
    auto, bf16 = (configuration(load_run(runs[a])) for a in ("auto", "bf16"))
    assert auto["amp"] == "bf16" and auto == bf16


def test_the_training_step_autocasts_in_the_resolved_precision(tmp_path, monkeypatch, native):
    from vitmoe.training.loop import step

    seen = []
    real = step.autocast_context
    monkeypatch.setattr(step, "autocast_context", lambda amp, device: seen.append(amp) or real(amp, device))
    assert main(["train", "--model", "vit", "--dataset", "digits", "--epochs", "1", "--batch", "512", "--amp", "auto",
                 "--out", str(tmp_path / "run"), "--device", "cpu", *TINY_SETS]) == 0
    assert seen and set(seen) == {"bf16" if native else "off"}  # resolved once in TrainStep, never "auto"
