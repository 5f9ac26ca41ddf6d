from importlib import metadata

import torch

import importlib

doctor_mod = importlib.import_module("llmsys_lab.doctor")


def test_cli_reports_versions_device_and_triton_mode(cli):
    out = cli("doctor")                  # in this process; tests/test_packaging.py runs it from the installed wheel
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("torch", "triton", "transformers", "ipywidgets", "nbval"):
        assert f"  {name}" in out.stdout
    assert "matches torch.softmax" in out.stdout
    assert ("compiled for the GPU" if torch.cuda.is_available() else "Triton interpreter") in out.stdout
    assert "everything the lessons need is here." in out.stdout


def test_missing_package_is_reported_with_a_fix(monkeypatch):
    real = metadata.version

    def fake_version(dist):
        if dist == "nbval":
            raise metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(doctor_mod.metadata, "version", fake_version)
    report = doctor_mod.doctor(verbose=False)
    assert not report.ok
    assert report.versions["nbval"] is None
    (what, fix), = [p for p in report.problems if "nbval" in p[0]]
    assert what == "nbval is not installed" and "pip install 'nbval>=0.11'" in fix
    assert "MISSING" in str(report) and "fix: pip install" in str(report)


def test_version_out_of_range_is_reported(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(doctor_mod.metadata, "version",
                        lambda d: "4.46.0" if d == "transformers" else real(d))
    report = doctor_mod.doctor(verbose=False)
    assert ("transformers 4.46.0 is outside the tested range <6,>=5.0",
            "pip install 'transformers<6,>=5.0'") in report.problems


def test_without_triton_off_linux_the_doctor_lists_limits_not_problems(monkeypatch):
    """macOS / native Windows: no Triton wheel exists, so its absence is a limitation to explain."""
    monkeypatch.setattr(doctor_mod, "triton_available", lambda: False)
    monkeypatch.setattr(doctor_mod, "TRITON_PLATFORMS", ())
    report = doctor_mod.doctor(verbose=False)
    assert report.ok, report.problems
    assert report.versions["triton"] is None and report.triton.startswith("unavailable")
    assert [where for where, _ in report.limited] == ["lesson 00", "lesson 04", "lesson 05", "lesson 06",
                                                      "lesson 07", "lesson 09", "assignment 06", "assignment 07"]
    assert "limited on this machine:" in str(report) and "not gradable on this machine" in str(report)


def test_without_triton_on_linux_it_is_a_problem_with_the_fix(monkeypatch):
    monkeypatch.setattr(doctor_mod, "triton_available", lambda: False)
    monkeypatch.setattr(doctor_mod.sys, "platform", "linux")
    report = doctor_mod.doctor(verbose=False)
    (what, fix), = [p for p in report.problems if "triton" in p[0]]
    assert what.startswith("triton is not installed") and fix.startswith("pip install 'triton")


def test_triton_is_not_required_where_its_marker_excludes_it(monkeypatch):
    """The version check reads pyproject's requirements with their markers: on macOS there is no
    triton range to check against."""
    monkeypatch.setattr(doctor_mod.sys, "platform", "darwin")
    from packaging.markers import default_environment

    env = {**default_environment(), "sys_platform": "darwin"}
    monkeypatch.setattr("packaging.markers.default_environment", lambda: env)
    assert "triton" not in doctor_mod._required_ranges() and "torch" in doctor_mod._required_ranges()


def test_every_lesson_and_assignment_that_skips_triton_work_is_listed():
    """A notebook that prints "Triton unavailable: ..." somewhere (triton_note) must be in the doctor's list
    (the course manifest's without_triton), pending lessons included."""
    from pathlib import Path

    from llmsys_lab import course

    root = Path(__file__).resolve().parent.parent
    listed = {where for where, _ in course.without_triton()}
    found = set()
    for lesson in course.LESSONS:
        for kind, rel in (("lesson", lesson.notebook), ("assignment", lesson.solution)):
            if rel and "triton_note(" in (root / rel).read_text():
                found.add(f"{kind} {lesson.number:02d}")
    assert found and found <= listed, f"without_triton not set in llmsys_lab/course.py: {sorted(found - listed)}"
