"""Only what pyproject.toml cannot say: put hawqtool-torchvision.pth into the wheel's top level, so that
`pip install .` / `pip install 'hawqtool[vision]'` install it into site-packages beside
_hawqtool_startup.py (why: see that module). Editable installs (`pip install -e`, the Makefile) do not
carry it; the Makefile copies it into the venv itself."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "hawqtool-torchvision.pth"


class BuildPyWithPth(build_py):
    """build_py that also copies the .pth file to the top of the build (the wheel's purelib root)."""

    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
