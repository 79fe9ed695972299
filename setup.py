"""Build hook: the generated protobuf package ``sidecar._pb`` is made by the build, not checked in.

Everything else about the package is in pyproject.toml; this file only adds a ``build_py`` that
runs proto/generate.py (grpcio-tools, a pinned build requirement) after the written code is
copied. A wheel therefore carries code generated from the protos in its own source, by the
grpcio-tools version pyproject.toml pins, whatever the checkout it was built from holds under
sidecar/_pb (the sdist leaves that directory out; see MANIFEST.in).

- wheel (``python -m build``, ``pip wheel .``, ``pip install .``): into the build directory, so
  it lands in the wheel and the source tree is not touched.
- editable install (``pip install -e .``): into the source tree, as ``make proto`` does, since
  that is where an editable install imports from.

A protoc failure fails the build: a wheel without ``sidecar._pb`` would install and then die at
import.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import ExecError

ROOT = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        super().run()
        # Loaded by path: proto/ is not a package, and nothing of it is shipped.
        spec = importlib.util.spec_from_file_location("_safous_proto_generate", ROOT / "proto" / "generate.py")
        assert spec is not None and spec.loader is not None
        generator = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(generator)
        out_dir = generator.OUT_DIR if self.editable_mode else Path(self.build_lib) / "sidecar" / "_pb"
        if generator.generate(out_dir) != 0:
            raise ExecError("proto/generate.py failed: no sidecar._pb, no package")


setup(cmdclass={"build_py": BuildPyWithProtos})
