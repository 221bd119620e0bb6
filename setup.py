"""
Everything about the package is in pyproject.toml; this file adds one step to
the build: ``muxtwist-startup.pth`` goes to the top of site-packages, so the
interpreter of ``twistd ... muxtwist`` holds SIGHUP before twistd's own
imports (see ``_muxtwist_startup.py``).
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

STARTUP_HOOK = "muxtwist-startup.pth"


class BuildWithStartupHook(build_py):
    """``build_py`` that also puts the ``.pth`` startup hook beside the packages."""

    def run(self) -> None:
        super().run()
        self.copy_file(STARTUP_HOOK, os.path.join(self.build_lib, STARTUP_HOOK), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, STARTUP_HOOK)]


setup(cmdclass={"build_py": BuildWithStartupHook})
