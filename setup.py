"""The C part of pmfs: the hot loops of a metadata commit (pmfs/_accel.c).

Everything else is in pyproject.toml.  The extension is optional: where
it cannot be compiled (no C compiler or Python headers) pip installs pmfs
without it, with a warning, and pmfs/accel.py falls back to pure Python
(`./setup.sh` installs gcc and python3-dev, and tests/test_accel.py fails
when the module is missing).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pmfs._accel", ["pmfs/_accel.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
                             optional=True)])
