"""`deploytool bundle` replaces only what it wrote itself: refusals (exit 2, one line, before any work),
the .deploytool-bundle marker, replacing an earlier bundle, and --force."""

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

import deploytool.bundle.target as bundle_target
import deploytool.bundle.write as bundle_write
from deploytool.bundle.target import MARKER, bundle_files, check_bundle_target
from deploytool.bundle.write import write_bundle
from deploytool.cli import app
from deploytool.errors import SpecError
from deploytool.progress import PREFIX as PROGRESS_PREFIX
from deploytool.targets.build import runner_source_dir

IMAGES = Path(__file__).resolve().parent.parent / "images"
cli = CliRunner()
META = {
    "model": "m",
    "task": "classify",
    "input": {"name": "in0", "width": 8, "height": 8, "color": "rgb", "resize": "resize"},
    "outputs": ["out0"],
}


def _invoke(*args):
    return cli.invoke(app, [str(a) for a in args])


def _refused(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith(PROGRESS_PREFIX)]
    assert len(lines) == 1 and lines[0].startswith("error: --out"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def here(tmp_path, monkeypatch):
    """Run in an empty folder under tmp_path, with HOME elsewhere under tmp_path."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return cwd


def _model_files(folder: Path, content: bytes = b"weights-1") -> tuple[Path, Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "p.param").write_text("7767517\n")
    (folder / "p.bin").write_bytes(content)
    (folder / "report.json").write_text('{"passed": true}\n')
    return folder / "p.param", folder / "p.bin", folder / "report.json"


def _write(out, content=b"weights-1", **kw):
    param, bin_, report = _model_files(out.parent / "src-files", content)
    return write_bundle(out, param, bin_, META, report, **kw)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp" in p.name or ".old" in p.name]


# ---- refusals through the CLI: exit 2, one line, nothing touched, no run folder made ----


def test_refuses_a_folder_it_did_not_write(here):
    docs = here / "mydocs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("thesis")
    _refused(
        _invoke("bundle", "resnet18", "--out", "mydocs", "--work", "w"), "mydocs", "thesis.txt", "--force"
    )
    assert (docs / "thesis.txt").read_text() == "thesis" and len(list(docs.iterdir())) == 1
    assert not (here / "w").exists()  # refused before the pipeline made anything


def test_refuses_an_existing_file(here):
    (here / "notes.txt").write_text("mine")
    _refused(_invoke("bundle", "resnet18", "--out", "notes.txt", "--work", "w"), "existing file")
    assert (here / "notes.txt").read_text() == "mine" and not (here / "w").exists()


@pytest.mark.parametrize(
    ("out", "needle"),
    [(".", "is the current folder"), ("..", "contains the current folder"), ("/", "contains the current")],
)
def test_refuses_the_current_folder_and_above(here, out, needle):
    (here / "thesis.txt").write_text("thesis")
    _refused(_invoke("bundle", "resnet18", "--out", out, "--work", "w"), needle)
    assert (here / "thesis.txt").read_text() == "thesis" and not (here / "w").exists()


def test_refuses_home_even_with_force(here, tmp_path):
    home = tmp_path / "home"
    _refused(_invoke("bundle", "resnet18", "--out", home, "--work", "w", "--force"), "home folder")
    assert not any(home.iterdir()) and not (here / "w").exists()


@pytest.mark.parametrize(
    ("out", "work", "needle"),
    [
        ("w", "w", "is the run folder w"),
        ("w/bundle", "w", "is inside the run folder w"),
        ("w", "w/run", "contains the run folder w/run"),
    ],
)
def test_refuses_the_run_folder(here, out, work, needle):
    """--out equal to --work would delete the run's own artifacts (even with --force)."""
    (here / work).mkdir(parents=True)
    (here / work / "model.pt").write_bytes(b"run artifact")
    _refused(_invoke("bundle", "resnet18", "--out", out, "--work", work, "--force"), needle)
    assert (here / work / "model.pt").read_bytes() == b"run artifact"
    assert not (here / "w" / "bundle").exists()


def test_out_containing_earlier_runs_is_refused(here):
    """`--out out` with the default run folder out/resnet18 and earlier runs under out/."""
    (here / "out" / "yolov8n").mkdir(parents=True)
    (here / "out" / "yolov8n" / "model.pt").write_bytes(b"earlier run")
    _refused(_invoke("bundle", "resnet18", "--out", "out"), "contains the run folder out/resnet18")
    assert (here / "out" / "yolov8n" / "model.pt").read_bytes() == b"earlier run"
    assert not (here / "out" / "resnet18").exists()
    # with another run folder it is still a folder the tool did not write
    _refused(_invoke("bundle", "resnet18", "--out", "out", "--work", "w"), "did not write", "yolov8n/")
    assert not (here / "w").exists()


def test_refuses_the_runner_sources(here):
    _refused(_invoke("bundle", "resnet18", "--out", runner_source_dir(), "--work", "w", "--force"), "sources")


def test_refuses_a_path_under_a_file(here):
    (here / "notes.txt").write_text("mine")
    _refused(_invoke("bundle", "resnet18", "--out", "notes.txt/b", "--work", "w"), "is a file")
    assert (here / "notes.txt").read_text() == "mine"


def test_refuses_a_damaged_marker_without_force(here):
    (here / "b").mkdir()
    (here / "b" / MARKER).write_text("not json")
    _refused(_invoke("bundle", "resnet18", "--out", "b", "--work", "w"), "damaged", "--force")


def test_refuses_a_folder_it_cannot_write(here, monkeypatch):
    monkeypatch.setattr(bundle_target.os, "access", lambda path, mode: False)
    _refused(_invoke("bundle", "resnet18", "--out", "b", "--work", "w"), "no permission")
    assert not (here / "w").exists()


def test_check_bundle_target_modes(here):
    """The check is check_bundle_target, called first by make_bundle."""
    (here / "mydocs").mkdir()
    (here / "mydocs" / "a.txt").write_text("a")
    with pytest.raises(SpecError, match="did not write"):
        check_bundle_target(Path("mydocs"), Path("w"))
    assert check_bundle_target(Path("mydocs"), Path("w"), force=True).mode == "into"
    assert check_bundle_target(Path("new"), Path("w")).mode == "new"
    (here / "empty").mkdir()
    assert check_bundle_target(Path("empty"), Path("w")).mode == "into"


# ---- what write_bundle does (fake model files: no pipeline) ----


def test_new_bundle_has_marker_listing_its_files_and_normal_permissions(here):
    out = _write(here / "deep" / "b")
    marker = json.loads((out / MARKER).read_text())
    assert marker["files"] == bundle_files() and marker["deploytool"]
    assert all((out / f).is_file() for f in marker["files"])
    assert ".deploytool-bundle" in (out / "README.md").read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert _leftovers(here / "deep") == []


def test_second_bundle_replaces_the_first_and_keeps_what_the_user_added(here):
    out = _write(here / "b", b"weights-1")
    (out / "build").mkdir()
    (out / "build" / "CMakeCache.txt").write_text("cache")  # the README's own cmake commands make this
    (out / "notes.txt").write_text("mine")
    (out / "src" / "extra.cpp").write_text("// mine")
    marker = json.loads((out / MARKER).read_text())
    marker["files"].append("stale.txt")  # a file an older deploytool wrote and the new one does not
    (out / MARKER).write_text(json.dumps(marker))
    (out / "stale.txt").write_text("old")

    _write(here / "b", b"weights-2")
    assert (out / "model.ncnn.bin").read_bytes() == b"weights-2"
    assert (out / "build" / "CMakeCache.txt").read_text() == "cache"
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "src" / "extra.cpp").read_text() == "// mine"
    assert not (out / "stale.txt").exists()
    assert _leftovers(here) == []


def test_a_user_file_with_a_bundle_name_needs_force(here):
    out = _write(here / "b")
    marker = json.loads((out / MARKER).read_text())
    marker["files"].remove("run_ncnn.py")  # so run_ncnn.py counts as the user's
    (out / MARKER).write_text(json.dumps(marker))
    (out / "run_ncnn.py").write_text("# my own runner")
    with pytest.raises(SpecError, match="run_ncnn.py was not written by deploytool.*--force"):
        _write(here / "b", b"weights-2")
    assert (out / "run_ncnn.py").read_text() == "# my own runner"
    _write(here / "b", b"weights-2", force=True)
    assert (out / "run_ncnn.py").read_text() != "# my own runner"
    assert (out / "model.ncnn.bin").read_bytes() == b"weights-2"


def test_force_adds_the_bundle_to_a_foreign_folder_and_deletes_nothing(here):
    docs = here / "mydocs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("thesis")
    (docs / "README.md").write_text("my readme")
    (docs / "sub").mkdir()
    (docs / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(SpecError, match="did not write"):
        _write(docs)
    _write(docs, force=True)
    assert (docs / "thesis.txt").read_text() == "thesis" and (docs / "sub" / "data.csv").read_text() == "1,2"
    assert "ncnn bundle" in (docs / "README.md").read_text()  # same name: replaced, as --force says
    assert json.loads((docs / MARKER).read_text())["files"] == bundle_files()
    assert sorted(p.name for p in docs.iterdir() if ".tmp" in p.name) == []
    # now it is a bundle: the next one replaces only the bundle's files, without --force
    _write(docs, b"weights-2")
    assert (docs / "thesis.txt").read_text() == "thesis" and (docs / "sub" / "data.csv").read_text() == "1,2"
    assert (docs / "model.ncnn.bin").read_bytes() == b"weights-2"
    assert _leftovers(here) == []


def test_force_never_replaces_a_folder_of_the_user_with_a_file(here):
    docs = here / "mydocs"
    (docs / "README.md").mkdir(parents=True)
    (docs / "README.md" / "chapter1.txt").write_text("text")
    with pytest.raises(SpecError, match="README.md in it is in the way"):
        _write(docs, force=True)
    assert (docs / "README.md" / "chapter1.txt").read_text() == "text"


def test_an_empty_folder_is_used_without_force(here):
    (here / "b").mkdir()
    _write(here / "b")
    assert (here / "b" / MARKER).is_file() and _leftovers(here / "b") == []


def test_a_symlink_to_a_bundle_is_followed_not_replaced(here):
    _write(here / "real")
    (here / "link").symlink_to(here / "real")
    _write(here / "link", b"weights-2")
    assert (here / "link").is_symlink()
    assert (here / "real" / "model.ncnn.bin").read_bytes() == b"weights-2"
    assert _leftovers(here) == []


def test_failed_swap_restores_the_earlier_bundle(here, monkeypatch):
    out = _write(here / "b", b"weights-1")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new bundle onto its place: interrupted
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(bundle_write.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _write(here / "b", b"weights-2")
    monkeypatch.undo()
    assert (out / "model.ncnn.bin").read_bytes() == b"weights-1" and (out / MARKER).is_file()
    assert _leftovers(here) == []


# ---- end to end: the real pipeline ----


@pytest.mark.slow
def test_bundle_force_then_rebundle_keeps_the_users_files(here):
    docs = here / "mydocs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("thesis")
    args = ("bundle", "resnet18", "--work", "w", "--images", IMAGES / "chelsea.jpg")
    result = _invoke(*args, "--out", "mydocs", "--force")
    assert result.exit_code == 0, result.output
    assert (docs / "thesis.txt").read_text() == "thesis"
    assert (docs / "model.ncnn.param").is_file() and (docs / MARKER).is_file()
    (docs / "build").mkdir()
    (docs / "build" / "CMakeCache.txt").write_text("cache")
    first = (docs / "meta.json").stat().st_ino

    result = _invoke(*args, "--out", "mydocs")  # its own bundle now: replaced without --force
    assert result.exit_code == 0, result.output
    assert (docs / "thesis.txt").read_text() == "thesis"
    assert (docs / "build" / "CMakeCache.txt").read_text() == "cache"
    assert (docs / "meta.json").stat().st_ino != first
    assert json.loads((docs / MARKER).read_text())["files"] == bundle_files()
    assert _leftovers(here) == [] and _leftovers(docs) == []
