"""The C part of pmfs: the hot loops of a metadata commit (pmfs/_accel.c).

Everything else is in pyproject.toml.  pmfs/accel.py falls back to pure
Python where the module is not built.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pmfs._accel", ["pmfs/_accel.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"])])
