from setuptools import setup

setup(cffi_modules=["ggml-ext/build_ffi.py:ffibuilder"])
