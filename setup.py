"""Packaging for productd: one package, one console script."""

from setuptools import find_packages, setup

setup(
    name="productd",
    version="0.1.0",
    description="Sharded live product-state service: ingest price/stock updates over HTTP, read them back fast.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["productd", "productd.*"]),
    package_data={"productd.http": ["openapi.json"]},
    install_requires=[
        "falcon>=4.0,<5",
        "gunicorn>=23",
        "msgpack>=1.0",
        "orjson>=3.9",
    ],
    entry_points={"console_scripts": ["productd = productd.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Framework :: Falcon",
    ],
)
