"""The wheel a cluster image is built from holds the whole tree (a package missing from pyproject's `packages` list
once shipped a wheel without `raylm/compress/`), and the installed wheel, not the editable checkout, imports."""
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {"platform/raylm": "raylm", "pipelines": "pipelines", "serve": "serve", "tuning": "tuning"}


def _tracked() -> set[str]:
    """Every tracked source and data file of the shipped packages, as its path inside the wheel."""
    out = subprocess.run(["git", "ls-files", *SHIPPED], cwd=REPO, capture_output=True, text=True, check=True)
    files = set()
    for f in out.stdout.split():
        for src, dst in SHIPPED.items():
            if f.startswith(src + "/") and not f.endswith((".md", ".pyc")):
                files.add(dst + f[len(src):])
    return files


def test_the_wheel_holds_every_module_and_config_and_imports_installed(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("raylm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_tracked() - names)
    assert not missing, f"tracked files the wheel lacks: {missing}"
    assert "raylm/compress/quant.py" in names and "pipelines/configs/lifecycle/tiny.yaml" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # the installed copy comes first on sys.path, ahead of the editable checkout's finder
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import raylm, raylm.compress.quant, raylm.capabilities, "
            "pipelines.quantize, serve.app, tuning; from raylm.harness.run import task_names; "
            "from raylm.stage import recipe; assert raylm.__file__.startswith(sys.argv[1]), raylm.__file__; "
            "assert recipe('quantize').__file__.startswith(sys.argv[1]); print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
