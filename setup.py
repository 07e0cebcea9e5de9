"""Only here to ship mergekit_collapse_hook.pth (the `mergekit-yaml --guard` hook); metadata is in
pyproject.toml.

setuptools has no declarative way to put a file at the top level of site-packages, so build_py
copies the .pth into the build tree (regular wheels) or straight into the editable wheel
(`pip install -e .`, which does not ship build_py's outputs).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "mergekit_collapse_hook.pth"


class build_py_with_pth(build_py):  # noqa: N801 - setuptools command naming
    """build_py that also installs mergekit_collapse_hook.pth at the top level of site-packages."""

    def run(self) -> None:
        super().run()
        source = Path(__file__).parent / PTH
        if getattr(self, "editable_mode", False):
            # editable_wheel points install_lib at the unpacked editable wheel's root
            target = Path(self.get_finalized_command("install").install_lib)
        else:
            target = Path(self.build_lib)
        target.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(source), str(target / PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(str(Path(self.build_lib) / PTH))
        return outputs


setup(cmdclass={"build_py": build_py_with_pth})
