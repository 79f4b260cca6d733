"""The report built in-process (epi.report.write_report) from directories and from packed archives: the committed
tables regenerate from their archives, an archive tabulates like the directories it was packed from, and an
archive's members can write nothing outside the temporary directory they are read from."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from epi import archive
from epi.errors import UserError
from epi.report import write_report
from tests.test_archive import heavy_sweep
from tests.test_report_intervals import arm, scores

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("docs/results")  # relative, as the committed tables' run paths are written
FI = [RESULTS / f"smollm2_forgetting_fi_seed{s}.tar.xz" for s in range(3)]


def test_a_committed_table_regenerates_from_its_archives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/results/smollm2_forgetting_format_instruct.md, exactly, from the three seeds' archives (README there)."""
    monkeypatch.chdir(ROOT)
    report = write_report(FI, tmp_path / "out")
    committed = (RESULTS / "smollm2_forgetting_format_instruct.md").read_text()
    assert (tmp_path / "out" / "report.md").read_text() == committed == report.markdown + "\n"
    # the JSON too, but for the runs' paths: <archive>/<job> where the table was made from the directory <sweep>/<job>
    data = json.loads((tmp_path / "out" / "report.json").read_text().replace(".tar.xz/", "/"))
    assert data == json.loads((RESULTS / "smollm2_forgetting_format_instruct.json").read_text())
    assert {r["path"].split("/")[2] for r in report.data["runs"]} == {p.name for p in FI}


@pytest.mark.parametrize("suffix", [".tar.xz", ".tar.gz"])
def test_a_packed_archive_tabulates_like_its_runs_and_packs_to_the_same_bytes(tmp_path: Path, suffix: str) -> None:
    sweep = heavy_sweep(tmp_path / "sweep")
    packed = tmp_path / f"sweep{suffix}"
    original = write_report(sweep, tmp_path / "out", archive=packed)
    files, size = original.archived
    assert packed.is_file() and not packed.with_name(packed.name + ".partial").exists() and files == len(archive.evidence([r.path for r in original.runs] + [u.path for u in original.unfinished])) and size > 0
    with tarfile.open(packed) as tar:
        names = tar.getnames()
        assert len(names) == files and names == sorted(names)
        assert all(m.isreg() and m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in tar.getmembers())
    assert "multirun.yaml" in names and "failed/error.txt" in names and "arm=epi-1/cpi/groups.json" in names
    assert not [n for n in names if n.endswith(".pt") or "/model/" in n or "/wandb/" in n], names
    again = write_report(packed, tmp_path / "again")
    assert again.markdown == original.markdown.replace(str(sweep), str(packed))  # only the listed failed run's path differs
    assert again.data == json.loads(json.dumps(original.data).replace(str(sweep), str(packed)))  # every number, every run
    assert not again.unfinished[0].path.exists()  # the temporary copy it was read from is gone
    # the same runs pack to the same bytes, from the directories or from the archive itself
    assert write_report(packed, tmp_path / "o3", archive=tmp_path / f"repacked{suffix}").archived == (files, size)
    assert (tmp_path / f"repacked{suffix}").read_bytes() == packed.read_bytes()
    with pytest.raises(UserError, match="already exists; give a new file name"):
        write_report(sweep, tmp_path / "o4", archive=packed)
    assert not (tmp_path / "o4").exists()


def test_archives_and_directories_together(tmp_path: Path) -> None:
    """runs=[<archive>, <dir>]: the seeds of one setting across both, each run named where it was read."""
    first, second = tmp_path / "s0", tmp_path / "s1"
    arm(first, "+arm=none", 0, {"a": scores(10), "b": scores(10)})
    arm(second, "+arm=none", 1, {"a": scores(12), "b": scores(12)})
    archive.archive_runs([first / "arm=none-0"], tmp_path / "s0.tar.xz")
    report = write_report([tmp_path / "s0.tar.xz", second], tmp_path / "out")
    assert "| arm=none | 2 | 0.275 ± 0.035 | 0.275 ± 0.035 | 0.275 ± 0.035 |" in report.markdown
    assert sorted(r["path"] for r in report.data["runs"]) == sorted([str(tmp_path / "s0.tar.xz" / "arm=none-0"), str(second / "arm=none-1")])


def crafted(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    good = tarfile.TarInfo("0/config.yaml")
    good.size = 1
    with tarfile.open(path, "w:xz") as tar:
        tar.addfile(good, io.BytesIO(b"x"))
        if member.isreg():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(("bad", "why"), [
    (member("../outside.txt"), "has a '..' in its name"),
    (member("0/../../outside.txt"), "has a '..' in its name"),
    (member("/tmp/outside.txt"), "has an absolute name"),
    (member("0/link", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
    (member("0/hard", tarfile.LNKTYPE, "0/config.yaml"), "is a link"),
    (member("0/dev", tarfile.CHRTYPE), "is a device or special file"),
    (member("0/fifo", tarfile.FIFOTYPE), "is a device or special file"),
])
def test_an_unsafe_member_is_refused_and_writes_nothing_outside(tmp_path: Path, bad: tarfile.TarInfo, why: str) -> None:
    packed = crafted(tmp_path / "evil.tar.xz", bad)
    into = tmp_path / "deep" / "into"
    into.mkdir(parents=True)
    with pytest.raises(UserError, match=f"member {bad.name!r} {why}"):
        archive.unpack(packed, into)
    assert not (tmp_path / "deep" / "outside.txt").exists() and not (tmp_path / "outside.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "evil.tar.xz"]
    with pytest.raises(UserError, match=why):  # and through the report, whose temporary copy is removed
        write_report(packed, tmp_path / "out")


def test_an_unreadable_or_missing_archive_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken.tar.xz").write_bytes(b"not xz at all")
    with pytest.raises(UserError, match=r"broken.tar.xz.*not a readable archive"):
        write_report(tmp_path / "broken.tar.xz", tmp_path / "out")
    with pytest.raises(UserError, match=r"no such archive file"):
        write_report(tmp_path / "missing.tar.xz", tmp_path / "out")


def test_a_long_setting_gives_a_plot_file_name_a_file_system_takes() -> None:
    """A sweep over local data files names them in its overrides: the setting runs to thousands of characters, and a
    plot named after it could not be written (file names stop at 255 bytes). Cut, with a hash of the whole."""
    from epi.report.document import _file_part

    long_a, long_b = "arm=cpi " + "data.sources.x.train=/tmp/" + "a" * 400, "arm=cpi " + "data.sources.x.train=/tmp/" + "a" * 399 + "b"
    assert _file_part("arm=cpi seed=0") == "arm=cpi_seed=0"
    assert len(_file_part(long_a)) <= 140 and _file_part(long_a) != _file_part(long_b)
