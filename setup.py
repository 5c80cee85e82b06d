"""The one thing pyproject.toml cannot say: the optional compiled loops, proxy/wire/_scan.c (message
framing) and proxy/analysis/_shape.c (statement shapes).

``optional=True``: without a C compiler or Python's headers the build goes on without
them, and proxy.wire.codec and proxy.analysis.shape use the same loops in Python.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("proxy.wire._scan", ["proxy/wire/_scan.c"], optional=True),
                   Extension("proxy.analysis._shape", ["proxy/analysis/_shape.c"], optional=True)])
