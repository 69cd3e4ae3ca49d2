"""The environment the README's set-up makes: plain transformers works in a user's own script.

PyPI's torchvision for torch 2.13 (pulled in by timm) is a CUDA build that cannot load beside CPU torch;
without the start-up hook (`_hawqtool_startup.py`, run by `hawqtool-torchvision.pth`) a script that does
not import hawqtool first fails at `from transformers import LlamaConfig`. These tests run such scripts
in fresh interpreters of this venv, and check that a wheel of the project carries the hook.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter of this venv, away from the repository and without PYTHONPATH, as a
    user's own script would run."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_plain_transformers_import_works_without_importing_hawqtool(tmp_path):
    res = _python("from transformers import LlamaConfig, LlamaForCausalLM\n"
                  "m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,\n"
                  "    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))\n"
                  "print(sum(p.numel() for p in m.parameters()))", tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.split()[-1]) > 0


def test_timm_and_torchvision_import_in_a_plain_script(tmp_path):
    res = _python("import timm, torchvision\nm = timm.create_model('resnet18', pretrained=False, num_classes=3)\n"
                  "print(m.fc.out_features)", tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-1] == "3"


def test_the_start_up_hook_is_installed_and_costs_no_torch_import(tmp_path):
    """The hook is active in every interpreter of the venv (the set-up installed the .pth), yet imports
    nothing heavy until torchvision is looked up."""
    res = _python("import sys\nprint('_hawqtool_startup' in sys.modules, 'torch' in sys.modules)", tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["True", "False"], "hawqtool-torchvision.pth is not in this venv: run `make setup`"


def test_a_wheel_of_the_project_carries_the_hook(tmp_path):
    """`pip install .` / `pip install 'hawqtool[vision]'` install from a wheel: the .pth and the hook module
    must sit at its top level (setup.py adds the .pth; pyproject names the module)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "build")
    for name in ("hawqtool", "quant_kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md", "hawqtool-torchvision.pth", "_hawqtool_startup.py"):
        shutil.copy2(ROOT / name, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", str(src), "-w", str(tmp_path / "dist")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("hawqtool-*.whl"))
    top = {n for n in zipfile.ZipFile(wheel).namelist() if "/" not in n}
    assert top == {"_hawqtool_startup.py", "hawqtool-torchvision.pth"}
    pth = zipfile.ZipFile(wheel).read("hawqtool-torchvision.pth").decode()
    assert pth.startswith("import ") and "_hawqtool_startup" in pth  # site.py runs only lines starting with import
