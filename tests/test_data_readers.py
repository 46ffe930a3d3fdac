"""Dataset readers: CIFAR pickles, Fashion-MNIST IDX, digits, search paths, downloads and error reporting."""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import vitmoe.data as data
from vitmoe.data import DATASETS, DatasetError, load_dataset, resolve_data_dir, search_roots
from vitmoe.data import cifar, digits, download, fashion_mnist

REAL_FMNIST = Path(__file__).parents[2] / "shared/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No $DATA, cwd in a scratch dir (so ./data is empty), no system dirs, no network."""
    monkeypatch.delenv("DATA", raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", (str(tmp_path / "no-system-dir"),))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(download, "urlopen", no_network)


# ---------------------------------------------------------------- CIFAR


def _write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def make_cifar10(root: Path, per_batch: int = 5, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write cifar-10-batches-py/ in the official layout; returns split -> (images NCHW, labels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out: dict[str, list] = {"train": [], "test": []}
    files = [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]
    for fname, split in files:
        rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        _write_pickle(folder / fname, {
            "batch_label": f"{fname} of 5", "labels": labels, "data": rows,
            "filenames": [f"img_{fname}_{i}.png" for i in range(per_batch)],
        })
        out[split].append((rows, np.array(labels)))
    _write_pickle(folder / "batches.meta", {"label_names": data.info.CIFAR10_CLASSES, "num_cases_per_batch": per_batch})
    return {
        s: (np.concatenate([r for r, _ in v]).reshape(-1, 3, 32, 32), np.concatenate([l for _, l in v]))
        for s, v in out.items()
    }


def make_cifar100(root: Path, n_train: int = 30, n_test: int = 12) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        _write_pickle(folder / split, {
            "filenames": [f"{i}.png" for i in range(n)], "batch_label": split,
            "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": rows,
        })
        out[split] = (rows.reshape(-1, 3, 32, 32), np.array(fine))
    _write_pickle(folder / "meta", {"fine_label_names": data.info.CIFAR100_CLASSES, "coarse_label_names": []})
    return out


def test_cifar10_round_trip_and_chw_layout(tmp_path):
    root = tmp_path / "d"
    expected = make_cifar10(root)
    # Mark one pixel explicitly: row index c*1024 + h*32 + w must land at [c, h, w].
    path = root / "cifar-10-batches-py" / "data_batch_2"
    entry = pickle.loads(path.read_bytes(), encoding="latin1")
    entry["data"][1, 2 * 1024 + 5 * 32 + 7] = 77
    entry["data"][1, 0 * 1024 + 31 * 32 + 0] = 201
    _write_pickle(path, entry)

    train = load_dataset("cifar10", "train", data_dir=root, download=False)
    test = load_dataset("cifar10", "test", data_dir=root, download=False)
    assert train.images.shape == (25, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and test.images.shape == (5, 3, 32, 32)
    assert train.images[5 + 1, 2, 5, 7] == 77 and train.images[5 + 1, 0, 31, 0] == 201
    exp_imgs, exp_labels = expected["train"]
    exp_imgs[6, 2, 5, 7], exp_imgs[6, 0, 31, 0] = 77, 201
    assert np.array_equal(train.images.numpy(), exp_imgs)
    assert np.array_equal(train.labels.numpy(), exp_labels)
    assert np.array_equal(test.images.numpy(), expected["test"][0])
    assert np.array_equal(test.labels.numpy(), expected["test"][1])
    assert train.info is DATASETS["cifar10"]


def test_cifar100_round_trip_fine_labels(tmp_path):
    expected = make_cifar100(tmp_path)
    for split in ("train", "test"):
        ds = load_dataset("cifar100", split, data_dir=tmp_path, download=False)
        assert np.array_equal(ds.images.numpy(), expected[split][0])
        assert np.array_equal(ds.labels.numpy(), expected[split][1])
        assert ds.info.num_classes == 100 and len(ds.info.classes) == 100


def test_cifar_found_via_env_and_cwd(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "env")
    monkeypatch.setenv("DATA", str(tmp_path / "env"))
    assert len(load_dataset("cifar10", "test", download=False)) == 5
    monkeypatch.delenv("DATA")
    make_cifar10(Path("data"))  # ./data relative to the (scratch) cwd
    assert len(load_dataset("cifar10", "test", download=False)) == 5


def test_cifar_truncated_pickle_names_file(tmp_path):
    make_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DatasetError, match="data_batch_3 is truncated or corrupt"):
        load_dataset("cifar10", "train", data_dir=tmp_path, download=False)
    # The test split does not touch the damaged file.
    assert len(load_dataset("cifar10", "test", data_dir=tmp_path, download=False)) == 5


def test_cifar_missing_batch_file_names_file(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetError, match=r"data_batch_4 is missing"):
        load_dataset("cifar10", "train", data_dir=tmp_path, download=False)


def test_cifar_pickle_cannot_run_code(tmp_path):
    make_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    _write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {"data": Evil(), "labels": []})
    with pytest.raises(DatasetError, match="test_batch is truncated or corrupt"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    assert not marker.exists()


def test_cifar_bad_shape_rejected(tmp_path):
    make_cifar10(tmp_path)
    _write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch",
                  {"data": np.zeros((3, 3000), np.uint8), "labels": [0, 1, 2]})
    with pytest.raises(DatasetError, match=r"test_batch holds data uint8 \(3, 3000\)"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)


def test_cifar_missing_no_download_names_dirs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(download, "urlopen", lambda *a, **k: calls.append(a) or pytest.fail("downloaded"))
    monkeypatch.setenv("DATA", str(tmp_path / "envdir"))
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", "train", data_dir=tmp_path / "explicit", download=False)
    msg = str(err.value)
    for d in (tmp_path / "explicit", tmp_path / "envdir", Path.cwd() / "data"):
        assert str(d) in msg
    assert "cifar-10-batches-py" in msg and "cifar-10-python.tar.gz" in msg and "download=False" in msg
    assert "c58f30108f718f92721af3b95e74349a" in msg
    assert calls == []


def test_cifar_download_offline_clear_error(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar100", "train", data_dir=tmp_path / "dl", download=True)
    msg = str(err.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg
    assert "network disabled in tests" in msg and str(tmp_path / "dl") in msg and "cifar-100-python/" in msg
    assert not (tmp_path / "dl").exists()  # no partial file, nor the folder made for the download


def _tar_gz(src_root: Path, folder: str, dest: Path) -> str:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src_root / folder, arcname=folder)
    return hashlib.md5(dest.read_bytes()).hexdigest()


def _serve_cifar10(tmp_path: Path, monkeypatch, md5: str | None = None) -> tuple[dict, str]:
    """Build a real tar.gz, point the cifar10 source at it through file:// and restore real urlopen."""
    src = tmp_path / "src"
    expected = make_cifar10(src)
    archive = tmp_path / "server" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    real_md5 = _tar_gz(src, "cifar-10-batches-py", archive)
    spec = cifar.CIFAR_SOURCES["cifar10"]
    monkeypatch.setitem(cifar.CIFAR_SOURCES, "cifar10", cifar.CifarSource(
        archive.as_uri(), md5 or real_md5, spec.archive, spec.folder, spec.splits, spec.label_key))
    monkeypatch.setattr(download, "urlopen", urllib.request.urlopen)
    return expected, real_md5


def test_cifar_download_verifies_md5_and_extracts(tmp_path, monkeypatch):
    expected, _ = _serve_cifar10(tmp_path, monkeypatch)
    target = tmp_path / "dl"
    ds = load_dataset("cifar10", "test", data_dir=target)
    assert np.array_equal(ds.images.numpy(), expected["test"][0])
    assert (target / "cifar-10-python.tar.gz").is_file() and (target / "cifar-10-batches-py").is_dir()
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_cifar_download_md5_mismatch_rejected(tmp_path, monkeypatch):
    _serve_cifar10(tmp_path, monkeypatch, md5="0" * 32)
    target = tmp_path / "dl"
    with pytest.raises(DatasetError, match="md5 mismatch"):
        load_dataset("cifar10", "train", data_dir=target)
    assert not target.exists()  # temp file removed, nothing renamed into place, the folder made for it gone


def test_cifar_hand_placed_archive_used_offline(tmp_path, monkeypatch):
    expected, real_md5 = _serve_cifar10(tmp_path, monkeypatch)
    target = tmp_path / "placed"
    target.mkdir()
    (target / "cifar-10-python.tar.gz").write_bytes((tmp_path / "server" / "cifar-10-python.tar.gz").read_bytes())
    ds = load_dataset("cifar10", "train", data_dir=target, download=False)
    assert np.array_equal(ds.labels.numpy(), expected["train"][1])

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cifar-10-python.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(DatasetError, match=r"bad/cifar-10-python.tar.gz has md5"):
        load_dataset("cifar10", "train", data_dir=bad, download=False)


def test_extract_refuses_path_traversal(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        payload = b"x"
        info = tarfile.TarInfo("cifar-10-batches-py/../../escaped")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DatasetError, match="refusing to extract"):
        download.extract_folder(archive, out, "cifar-10-batches-py")
    assert not (tmp_path / "escaped").exists() and list(out.iterdir()) == []


# ---------------------------------------------------------------- Fashion-MNIST


def write_idx(path: Path, array: np.ndarray, magic: int, gz: bool, header_n: int | None = None) -> Path:
    n = array.shape[0] if header_n is None else header_n
    header = struct.pack(">ii", magic, n) + b"".join(struct.pack(">i", d) for d in array.shape[1:])
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_fmnist(directory: Path, n_train: int = 20, n_test: int = 7, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        img_stem, lbl_stem = fashion_mnist.FILES[split]
        write_idx(directory / img_stem, images, 2051, gz)
        write_idx(directory / lbl_stem, labels, 2049, gz)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_fmnist_round_trip(tmp_path, gz):
    expected = make_fmnist(tmp_path, gz=gz)
    for split in ("train", "test"):
        ds = load_dataset("fashion-mnist", split, data_dir=tmp_path, download=False)
        assert ds.images.shape == (len(expected[split][0]), 1, 28, 28) and ds.images.dtype == torch.uint8
        assert np.array_equal(ds.images[:, 0].numpy(), expected[split][0])
        assert np.array_equal(ds.labels.numpy(), expected[split][1].astype(np.int64))


@pytest.mark.parametrize("sub", ["fashion-mnist", "FashionMNIST/raw"])
def test_fmnist_subfolders_and_env(tmp_path, monkeypatch, sub):
    make_fmnist(tmp_path / "envroot" / sub, n_test=3)
    monkeypatch.setenv("DATA", str(tmp_path / "envroot"))
    assert len(load_dataset("fashion_mnist", "test", download=False)) == 3


def test_fmnist_system_dir_searched_last(tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    make_fmnist(system, n_test=4)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", (str(system),))
    assert len(load_dataset("fashion-mnist", "test", download=False)) == 4
    make_fmnist(Path("data"), n_test=2)  # ./data wins over the system directory
    assert len(load_dataset("fashion-mnist", "test", download=False)) == 2


@pytest.mark.parametrize("gz", [True, False])
def test_fmnist_truncated_images_named(tmp_path, gz):
    make_fmnist(tmp_path, gz=gz)
    images = np.zeros((60, 28, 28), np.uint8)
    path = write_idx(tmp_path / "train-images-idx3-ubyte", images, 2051, gz, header_n=60000)
    expected = f"{path} is truncated: header says 60000 images of 28x28 (47040000 bytes) but the file holds 47040"
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", "train", data_dir=tmp_path, download=False)
    assert str(err.value) == f"fashion-mnist: {expected}"


def test_fmnist_trailing_bytes_rejected(tmp_path):
    make_fmnist(tmp_path, gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte is corrupt \(trailing data\): header says 7"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path, download=False)


def test_fmnist_cut_gzip_stream_named(tmp_path):
    make_fmnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz is truncated or corrupt"):
        load_dataset("fashion-mnist", "train", data_dir=tmp_path, download=False)


@pytest.mark.parametrize("which,magic", [("images", 2049), ("labels", 2051)])
def test_fmnist_wrong_magic_named(tmp_path, which, magic):
    make_fmnist(tmp_path, gz=True)
    if which == "images":
        path = write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((7, 28, 28)), magic, True)
    else:
        path = write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(7), magic, True)
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path, download=False)
    assert f"{path} has magic number {magic}" in str(err.value)


def test_fmnist_wrong_dims_and_count_mismatch(tmp_path):
    make_fmnist(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((7, 32, 32)), 2051, False)
    with pytest.raises(DatasetError, match="holds 32x32 images, expected 28x28"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path, download=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((6, 28, 28)), 2051, False)
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte holds 6 images but .*t10k-labels-idx1-ubyte holds 7"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path, download=False)


def test_fmnist_missing_names_searched_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA", str(tmp_path / "envdir"))
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", "train", data_dir=tmp_path / "explicit", download=False)
    msg = str(err.value)
    assert "train-images-idx3-ubyte[.gz]" in msg and "download=False" in msg
    for d in (tmp_path / "explicit", tmp_path / "explicit/FashionMNIST/raw", tmp_path / "envdir/fashion-mnist",
              Path.cwd() / "data", tmp_path / "no-system-dir"):
        assert str(d) in msg
    assert msg.index(str(tmp_path / "explicit")) < msg.index(str(tmp_path / "envdir")) < msg.index(str(Path.cwd()))


def test_fmnist_download_verifies_content(tmp_path, monkeypatch):
    server = tmp_path / "server"
    expected = make_fmnist(server, gz=True)
    md5s = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in server.iterdir()}
    monkeypatch.setattr(fashion_mnist, "DOWNLOAD_BASE", server.as_uri() + "/")
    monkeypatch.setattr(fashion_mnist, "DOWNLOAD_MD5", md5s)
    monkeypatch.setattr(download, "urlopen", urllib.request.urlopen)
    ds = load_dataset("fashion-mnist", "test", data_dir=tmp_path / "dl")
    assert np.array_equal(ds.labels.numpy(), expected["test"][1])
    assert (tmp_path / "dl/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file()

    # Served file with a matching md5 but a bad IDX header: content verification still catches it.
    write_idx(server / "train-labels-idx1-ubyte", np.zeros(20), 2051, True)
    md5s["train-labels-idx1-ubyte.gz"] = hashlib.md5((server / "train-labels-idx1-ubyte.gz").read_bytes()).hexdigest()
    with pytest.raises(DatasetError, match=r"dl/fashion-mnist/train-labels-idx1-ubyte.gz has magic number 2051"):
        load_dataset("fashion-mnist", "train", data_dir=tmp_path / "dl")


def test_fmnist_download_offline_clear_error(tmp_path):
    with pytest.raises(DatasetError, match=r"downloading to .*fashion-mnist failed: network disabled"):
        load_dataset("fashion-mnist", "train", data_dir=tmp_path)


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="shared Fashion-MNIST not present")
def test_real_fashion_mnist():
    train = load_dataset("fashion-mnist", "train", data_dir=REAL_FMNIST, download=False)
    test = load_dataset("fashion-mnist", "test", data_dir=REAL_FMNIST, download=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.min() == 0 and train.labels.max() == 9
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    mean = train.images.float().mean().item() / 255
    assert abs(mean - DATASETS["fashion-mnist"].mean[0]) < 1e-3


# ---------------------------------------------------------------- digits, registry, search order


def test_digits_split_deterministic_and_stratified():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and (len(train), len(test)) == (1438, 359)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    again = load_dataset("digits", "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)

    from sklearn.datasets import load_digits

    y = load_digits().target
    idx = digits.split_indices(y)
    assert np.intersect1d(idx["train"], idx["test"]).size == 0
    assert np.array_equal(np.union1d(idx["train"], idx["test"]), np.arange(1797))
    per_class = np.bincount(y)
    assert np.array_equal(np.bincount(y[idx["test"]]), np.rint(0.2 * per_class).astype(int))
    assert np.array_equal(test.labels.numpy(), y[idx["test"]])


def test_digits_info_stats_match_train_split():
    train = load_dataset("digits", "train")
    x = train.images.double() / 255
    info = DATASETS["digits"]
    assert abs(x.mean().item() - info.mean[0]) < 1e-3 and abs(x.std(unbiased=False).item() - info.std[0]) < 1e-3
    assert info.hflip is False and info.crop_padding == 1 and info.in_chans == 1 and info.img_size == 8


def test_registry_values():
    assert list(DATASETS) == ["cifar10", "cifar100", "fashion-mnist", "digits"]
    c10, c100, fm = DATASETS["cifar10"], DATASETS["cifar100"], DATASETS["fashion-mnist"]
    assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.2470, 0.2435, 0.2616)
    assert c100.mean == (0.5071, 0.4865, 0.4409) and c100.std == (0.2673, 0.2564, 0.2762)
    assert (c10.crop_padding, c10.hflip, c10.in_chans, c10.img_size, c10.num_classes) == (4, True, 3, 32, 10)
    assert (fm.mean, fm.std, fm.crop_padding, fm.hflip) == ((0.2860,), (0.3530,), 2, True)
    assert c100.classes[:3] == ["apple", "aquarium_fish", "baby"] and c100.classes[-1] == "worm"


def test_unknown_dataset_and_split():
    with pytest.raises(DatasetError, match="choose one of: cifar10, cifar100, fashion-mnist, digits"):
        load_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset("digits", "val")


def test_one_registry_of_dataset_names(monkeypatch):
    """The config check, the --dataset flag and the report table all read vitmoe.data's registry:
    an alias added there is accepted by each, with no other edit."""
    import argparse
    from types import SimpleNamespace

    from vitmoe.cli.options import dataset_arg, dataset_metavar
    from vitmoe.report.table import _dataset
    from vitmoe.training.config.train_config import TrainConfig

    for spelling in ("fashion_mnist", "FashionMNIST", "Fashion-MNIST", "fashionmnist"):
        assert data.builtin_name(spelling) == "fashion-mnist" and dataset_arg(spelling) == "fashion-mnist"
        assert _dataset(SimpleNamespace(dataset=spelling)) == "fashion-mnist"
    assert _dataset(SimpleNamespace(dataset="My_Set")) == "my_set"  # unknown to this version: kept
    assert data.builtin_name("imagenet") is None
    assert dataset_metavar() == "{cifar10,cifar100,fashion-mnist,digits,folder:PATH}"

    monkeypatch.setitem(data.ALIASES, "fmnist", "fashion-mnist")
    assert dataset_arg("FMNIST") == "fashion-mnist" and _dataset(SimpleNamespace(dataset="fmnist")) == "fashion-mnist"
    assert TrainConfig(dataset="fmnist").validate().dataset == "fashion-mnist"
    with pytest.raises(argparse.ArgumentTypeError, match="unknown dataset 'mnist'; choose one of: cifar10"):
        dataset_arg("mnist")


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    assert resolve_data_dir(None) == Path("data")
    monkeypatch.setenv("DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    roots = search_roots(tmp_path / "x", extra=["/opt/d"])
    assert roots == [tmp_path / "x", tmp_path / "env", Path("data"), Path("/opt/d")]
    assert search_roots(tmp_path / "env") == [tmp_path / "env", Path("data")]  # deduplicated


def test_data_package_never_imports_torchvision():
    """No torchvision anywhere; Pillow only in the folder reader (your own image files), imported
    inside its functions, so the built-in datasets never need it."""
    pkg = Path(data.__file__).parent
    for source in pkg.glob("*.py"):
        tree = ast.parse(source.read_text())
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            roots = {n.split(".")[0] for n in names}
            assert "torchvision" not in roots, source
            if "PIL" in roots:
                assert source.name == "folder.py" and id(node) not in top_level, source


# ---------------------------------------------------------------- failed downloads leave nothing behind


def _download_fails_after(n_ok: int):
    """A `download_file` stand-in: the first `n_ok` calls write a (whole) file, then the network fails."""
    calls = []

    def fake(url, dest, md5=None, timeout=60.0):
        calls.append(dest)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)  # as the real one does before fetching
        if len(calls) > n_ok:
            raise urllib.error.URLError("connection reset")
        Path(dest).write_bytes(b"whole file")
        return Path(dest)

    return fake, calls


@pytest.mark.parametrize("n_ok", [0, 1])
def test_failed_fmnist_download_removes_the_folders_it_made(tmp_path, monkeypatch, n_ok):
    fake, calls = _download_fails_after(n_ok)
    monkeypatch.setattr(download, "download_file", fake)
    # Default target ./data/fashion-mnist (cwd is an empty scratch dir): neither folder may stay behind.
    with pytest.raises(DatasetError, match="connection reset"):
        load_dataset("fashion-mnist", "train")
    assert len(calls) == n_ok + 1 and calls[0] == Path("data/fashion-mnist/train-images-idx3-ubyte.gz")
    assert not Path("data").exists()
    # An explicit --data-dir that does not exist yet: the same.
    with pytest.raises(DatasetError, match="connection reset"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path / "new" / "dir")
    assert not (tmp_path / "new").exists()


def test_failed_download_keeps_folders_that_existed(tmp_path, monkeypatch):
    fake, _ = _download_fails_after(1)
    monkeypatch.setattr(download, "download_file", fake)
    mine = tmp_path / "mine"
    (mine / "fashion-mnist").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError):
        load_dataset("fashion-mnist", "train", data_dir=mine)
    # The folders were there before: they stay, with the one whole file fetched into them.
    assert sorted(p.name for p in (mine / "fashion-mnist").iterdir()) == ["train-images-idx3-ubyte.gz"]
    assert (mine / "notes.txt").read_text() == "keep me"


def test_failed_cifar_download_removes_the_folder_it_made(tmp_path, monkeypatch):
    fake, calls = _download_fails_after(0)
    monkeypatch.setattr(download, "download_file", fake)
    with pytest.raises(DatasetError, match="connection reset"):
        load_dataset("cifar10", "train")
    assert calls == [Path("data/cifar-10-python.tar.gz")] and not Path("data").exists()
    # A later search is not shadowed: the hand-placed folder in $DATA is found.
    make_cifar10(tmp_path / "env")
    monkeypatch.setenv("DATA", str(tmp_path / "env"))
    assert len(load_dataset("cifar10", "test", download=False)) == 5


def test_check_dataset_is_cheap_and_names_bad_files(tmp_path):
    make_fmnist(tmp_path / "ok", gz=True)
    data.check_dataset("fashion-mnist", tmp_path / "ok", download=False)
    make_fmnist(tmp_path / "raw", gz=False)
    data.check_dataset("fashion-mnist", tmp_path / "raw", download=False)
    # A cut raw file and a gzip whose trailer disagrees with its header are named.
    bad = tmp_path / "raw" / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte is truncated: header says 7 images"):
        data.check_dataset("fashion-mnist", tmp_path / "raw", download=False)
    write_idx(tmp_path / "ok" / "train-labels-idx1-ubyte", np.zeros(19), 2049, True)
    with pytest.raises(DatasetError, match=r"holds 20 images but .*train-labels-idx1-ubyte.gz holds 19 labels"):
        data.check_dataset("fashion-mnist", tmp_path / "ok", download=False)
    with pytest.raises(DatasetError, match="not found"):
        data.check_dataset("fashion-mnist", tmp_path / "empty", download=False)
    make_cifar10(tmp_path / "c")
    data.check_dataset("cifar10", tmp_path / "c", download=False)
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"data_batch_3 is missing"):
        data.check_dataset("cifar10", tmp_path / "c", download=False)
    data.check_dataset("digits")


def test_fmnist_gzip_bomb_rejected_after_reading_its_header(tmp_path):
    # 10 images announced, 64 MB of zeros behind them: compressed it is ~64 KB.
    import gzip
    import struct
    import tracemalloc

    from vitmoe.data.fashion_mnist import read_idx_images

    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(struct.pack(">iiii", 2051, 10, 28, 28))
        chunk = bytes(1 << 20)
        for _ in range(64):
            fh.write(chunk)
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=r"corrupt \(trailing data\): header says 10 images of 28x28"):
            read_idx_images(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"read {peak} bytes for a 10-image file"
    # A header that announces an absurd count is refused before any body is read.
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">iiii", 2051, 2**31 - 1, 28, 28))
    with pytest.raises(DatasetError, match="announces 2147483647 items"):
        read_idx_images(path)
