"""The one thing pyproject.toml cannot say: the optional compiled framing loop, proxy/wire/_scan.c.

``optional=True``: without a C compiler or Python's headers the build goes on without
it, and proxy.wire.codec uses the same loop in Python.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("proxy.wire._scan", ["proxy/wire/_scan.c"], optional=True)])
