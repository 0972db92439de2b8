"""Build script. Metadata lives in pyproject.toml; this file only adds the csrc/ extension build."""
from setuptools import setup

setup()
