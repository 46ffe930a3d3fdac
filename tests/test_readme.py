"""Every command line in README.md's bash blocks works: `vitmoe ...` lines parse with the real
parser (train lines also resolve their config, cheap ones run), `make` lines name Makefile
targets, scripts exist; and the demo's run time is stated the same way everywhere."""
import re
import shlex
from pathlib import Path

import pytest

from vitmoe.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_commands(text: str) -> list[str]:
    """Command lines of the ```bash blocks: continuation lines joined, blank lines dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        pending = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            line = pending + line
            pending = ""
            if line.strip():
                commands.append(line.strip())
    return commands


COMMANDS = bash_commands(README)


def _tokens(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def _vitmoe_argv(tokens: list[str]) -> list[str] | None:
    """The arguments of `vitmoe ...`, `python -m vitmoe ...` or `[srun] torchrun ... -m vitmoe ...`."""
    if tokens and tokens[0] == "vitmoe":
        return tokens[1:]
    for i in range(len(tokens) - 1):
        if tokens[i] == "-m" and tokens[i + 1] == "vitmoe":
            return tokens[i + 2:]
    return None


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.M))


def test_readme_has_commands():
    assert len(COMMANDS) >= 20
    assert any(c.startswith("vitmoe train") for c in COMMANDS) and "make demo" in [c.split("#")[0].strip() for c in COMMANDS]


# What the fine-tuning walkthrough starts from, made small: a transformers ViT directory and a folder of images.
WALKTHROUGH = ("vit-b16", "folder:my_images")


@pytest.fixture(scope="module")
def walkthrough_dir(tmp_path_factory):
    from PIL import Image

    import vitmoe
    from vitmoe.models.hf import export_hf

    root = tmp_path_factory.mktemp("walkthrough")
    dense = vitmoe.create_model("vit", img_size=224, patch_size=16, embed_dim=16, depth=2, num_heads=2,
                                mlp_hidden=32, head="linear", num_classes=3)
    export_hf(dense, root / "vit-b16", class_names=["a", "b", "c"])
    for split in ("train", "test"):
        for c, colour in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
            (root / "my_images" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20 + i, 24), colour).save(root / "my_images" / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("command", COMMANDS, ids=[c.split(" #")[0][:70] for c in COMMANDS])
def test_readme_command(command, monkeypatch, capsys, request):
    monkeypatch.chdir(ROOT)  # configs/... paths are relative to the repository
    if any(name in command for name in WALKTHROUGH):
        monkeypatch.chdir(request.getfixturevalue("walkthrough_dir"))
    tokens = _tokens(command)
    if not tokens:  # a comment line (e.g. #SBATCH)
        return
    if re.match(r"^[A-Za-z_]\w*=", tokens[0]):  # a shell variable assignment (SLURM example)
        return
    argv = _vitmoe_argv(tokens)
    if argv is not None:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:
            if "--help" in argv or "-h" in argv:
                assert e.code == 0
                return
            pytest.fail(f"README command does not parse ({capsys.readouterr().err.strip()}): {command}")
        if args.command == "train" and not args.resume:
            from vitmoe.cli.train import build_config

            build_config(args)  # values resolve (no data is touched)
        elif args.command == "info":
            assert main(argv) == 0, capsys.readouterr().err
        return
    if tokens[0] == "make":
        missing = set(tokens[1:]) - _makefile_targets()
        assert not missing, f"Makefile has no target {sorted(missing)}: {command}"
        return
    if tokens[0] in ("source", "."):  # activating the environment the Makefile creates
        assert tokens[1:] == [".venv/bin/activate"] and "$(BIN)/activate" in (ROOT / "Makefile").read_text(), command
        return
    if tokens[0] in ("python", "python3"):
        assert (ROOT / tokens[1]).is_file(), f"no script {tokens[1]}: {command}"
        return
    pytest.fail(f"README command of an unknown kind (teach tests/test_readme.py about it): {command}")


def test_help_runs(capsys):
    for argv in (["--help"], ["train", "--help"], ["demo", "--help"], ["info", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "--heads" in capsys.readouterr().out


def test_demo_time_is_stated_one_way(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps at the terminal's width, and may break "2-core"
    from vitmoe.cli.demo import DEMO_TIME

    assert DEMO_TIME in README.replace("\n", " ")
    for argv in (["--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert DEMO_TIME in text
        assert "few minutes" not in text and "about a minute" not in text
    assert "few minutes" not in README and "about a minute" not in README and "~1 min" not in README
