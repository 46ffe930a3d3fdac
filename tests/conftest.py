from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _signal_handlers_kept():
    """Put back the handlers of the signals a test may change: torch elastic (the in-process
    `--gpu N` launches) installs its own for these and never restores them, which would change
    what later tests' child processes inherit and how pytest itself stops."""
    import signal

    names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
    saved = {n: signal.getsignal(getattr(signal, n)) for n in names if hasattr(signal, n)}
    yield
    for n, handler in saved.items():
        if handler is not None:
            signal.signal(getattr(signal, n), handler)


@pytest.fixture(autouse=True, scope="session")
def _no_machine_kernel_table(tmp_path_factory):
    """Tests never read this machine's measured dispatch table (`vitmoe bench` writes it in
    ~/.cache/vitmoe): `dispatch: auto` is the shipped default in every test, here and in CI.
    Set in the environment, so worker processes the tests start inherit it."""
    import os

    old = os.environ.get("VITMOE_CACHE")
    os.environ["VITMOE_CACHE"] = str(tmp_path_factory.mktemp("vitmoe-cache"))
    yield
    if old is None:
        os.environ.pop("VITMOE_CACHE", None)
    else:
        os.environ["VITMOE_CACHE"] = old


# A width every preset accepts, small enough that a forward/backward takes milliseconds.
TINY = dict(embed_dim=24, depth=2, num_heads=2, mlp_hidden=32, head_hidden=16)
# The model the training tests train on digits, as TrainConfig.model_config: an epoch takes about
# a second, and 4 experts leave room for top-2 and expert parallelism over 2 ranks.
TINY_MC = dict(embed_dim=16, depth=2, num_heads=2, mlp_hidden=32, head_hidden=16, head="linear", num_experts=4)
# TINY_MC built directly (create_model) for digits' 8x8 gray images.
TINY_DIGITS = dict(img_size=8, in_chans=1, num_classes=10) | TINY_MC
# The width the command-line tests give `vitmoe train` (the preset's own expert count), without logs.
TINY_SETS = ["--set", "model.embed_dim=16", "--set", "model.depth=2", "--set", "model.num_heads=2",
             "--set", "model.mlp_hidden=32", "--set", "model.head=linear", "--set", "log_every=0"]


def grads(m, x, fn):
    """(output, input grad, grads of the parameters that got one) of `fn(x)` against a fixed
    float64 upstream gradient, so runs in different dtypes see the same numbers."""
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y.backward(g.to(y.dtype))
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.fixture(scope="session")
def digits():
    """The offline digits train and test splits (read once per test session)."""
    from vitmoe.data import load_dataset

    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if anything tries to load a dataset (errors must come first)."""
    import vitmoe.data as data

    def boom(*a, **k):
        raise AssertionError("data was loaded before the error")

    monkeypatch.setattr(data, "load_dataset", boom)


class Killed(Exception):
    """Stands for the process dying (kill -9) right after a checkpoint was written."""


@pytest.fixture
def kill_after_epoch(monkeypatch):
    """`kill_after_epoch(trainer, epoch=1)`: fit `trainer` as a run killed right after its epoch
    `epoch` checkpoint is complete (the checkpoint writer is restored afterwards)."""
    from vitmoe.training.checkpoints import checkpoint as ckpt

    def run(trainer, epoch: int = 1) -> None:
        real_save = ckpt.save_checkpoint

        def save_then_die(run_dir, ep, *a, **k):
            path = real_save(run_dir, ep, *a, **k)
            if ep == epoch:
                raise Killed
            return path

        monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
        try:
            with pytest.raises(Killed):
                trainer.fit()
        finally:
            monkeypatch.setattr(ckpt, "save_checkpoint", real_save)

    return run


@pytest.fixture(scope="session")
def digits512(digits):
    """The first 512 digits training images (4 steps of 128 per epoch) and the whole test split."""
    from vitmoe.data import ImageData

    train, test = digits
    return ImageData(train.images[:512], train.labels[:512], train.info), test


# A folder of real image files and a model trained on it (tests/test_predict.py, test_export_runtimes.py).
FOLDER_CLASSES = ("ant", "bee", "cat")
FOLDER_SIDE = 16


def write_image(path: Path, size: tuple[int, int], tint: int, seed: int, mode: str = "RGB") -> None:
    """A noisy image whose channel `tint` is brighter (so the classes differ), of any size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 90, (size[1], size[0], 3), dtype=np.uint8)
    a[..., tint] += 150
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).convert(mode).save(path)


@pytest.fixture(scope="session")
def folder_run(tmp_path_factory):
    """(root, run directory, new images folder): a vit (linear head: it exports) trained for two
    epochs on a folder of 3 classes, and 6 new files of other sizes, formats and modes."""
    from vitmoe.cli.main import main

    root = tmp_path_factory.mktemp("predict")
    k = 0
    for split, n in (("train", 6), ("test", 2)):
        for c, name in enumerate(FOLDER_CLASSES):
            for i in range(n):
                write_image(root / "imgs" / split / name / f"{i}.png", (14 + 3 * i, 20 - i), c, k)
                k += 1
    new = root / "new"
    for i in range(6):
        ext, mode = [(".png", "RGB"), (".jpg", "RGB"), (".png", "L"), (".bmp", "RGB"), (".png", "RGBA"), (".jpg", "L")][i]
        write_image(new / ("sub" if i >= 4 else "") / f"n{i}{ext}", (23 + i, 31 - 2 * i), i % 3, 100 + i, mode)
    run = root / "run"
    rc = main(["train", "--dataset", f"folder:{root / 'imgs'}", "--img-size", str(FOLDER_SIDE), "--model", "vit",
               "--epochs", "2", "--batch", "6", "--device", "cpu", "--out", str(run), "--lr", "0.01", *TINY_SETS])
    assert rc == 0
    return root, run, new


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A real 1-epoch switch_vit run on digits (TINY_SETS width, 4 experts): run directory with config,
    records and one verified checkpoint. Tests that change it work on a copy (`shutil.copytree`)."""
    from vitmoe.cli.main import main

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--batch", "256", "--experts", "4",
                 "--out", str(run), *TINY_SETS]) == 0
    return run
