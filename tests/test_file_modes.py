"""Every file and folder vitmoe writes follows the umask (nothing private 0600/0700 by accident)."""
import os
import stat

import pytest

import vitmoe
from vitmoe.fileio import atomic_write, atomic_write_text
from vitmoe.training.checkpoints import checkpoint as ckpt


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, fmode, dmode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o077, 0o600, 0o700)],
                         ids=["umask022", "umask002", "umask077"])
def test_checkpoints_and_atomic_writes_follow_the_umask(tmp_path, umask, mask, fmode, dmode):
    umask(mask)
    model = vitmoe.create_model("vit", embed_dim=8, depth=1, num_heads=2, mlp_hidden=8, head="linear")
    final = ckpt.save_checkpoint(tmp_path / "run", 1, model, {"epoch": 1})
    assert final == tmp_path / "run" / "checkpoints" / "epoch-0001"
    assert _mode(final) == dmode and _mode(final.parent) == dmode
    assert _mode(final / ckpt.MODEL_FILE) == fmode  # safetensors itself creates 0600
    assert _mode(final / ckpt.STATE_FILE) == fmode and _mode(final.parent / "latest") == fmode
    # Saving the same epoch again (resume) moves the old one aside through another temporary folder.
    assert _mode(ckpt.save_checkpoint(tmp_path / "run", 1, model, {"epoch": 1})) == dmode

    assert _mode(atomic_write_text(tmp_path / "a" / "x.json", "{}")) == fmode

    def private_writer(tmp):  # a writer that creates its file 0600, as safetensors does
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)

    assert _mode(atomic_write(tmp_path / "b.bin", private_writer)) == fmode
    vitmoe.save_model(model, tmp_path / "m.safetensors")
    assert _mode(tmp_path / "m.safetensors") == fmode
