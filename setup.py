"""Only here to ship ``nnunet_ssl.pth`` (the trainer-discovery start-up hook) at the top of site-packages,
for regular and editable installs alike; all metadata lives in pyproject.toml."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "nnunet_ssl.pth"


def _pth_text() -> str:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH)) as f:
        return f.read()


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


class _StrategyWithPth:
    """Wraps setuptools' editable strategy so the editable wheel carries the hook too.
    (``__editable__*.pth`` sorts before ``nnunet_ssl.pth``, so the package is importable when the hook runs.)"""

    def __init__(self, inner):
        self.inner = inner

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def __call__(self, wheel, files, mapping):
        self.inner(wheel, files, mapping)
        wheel.writestr(PTH, _pth_text())


class editable_wheel_with_pth(editable_wheel):
    def _select_strategy(self, name, tag, build_lib):
        return _StrategyWithPth(super()._select_strategy(name, tag, build_lib))


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
