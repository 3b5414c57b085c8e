"""The local-filesystem compile cache of libneuronxla, as far as optimum-neuron's hub cache wrapper uses it."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CACHE = "/var/tmp/neuron-compile-cache"


class CacheUrl:
    def __init__(self, url: str) -> None:
        self.url = url

    @classmethod
    def get_cache_url(cls, cache_dir: str | None = None) -> CacheUrl:
        return cls(cache_dir or os.environ.get("NEURON_COMPILE_CACHE_URL", DEFAULT_CACHE))

    def is_s3(self) -> bool:
        return self.url.startswith("s3://")


class CompileCache:
    def __init__(self, cache_url: CacheUrl) -> None:
        self.cache_url = cache_url

    def get_cache_dir_with_cache_key(self, key: str) -> str:
        return str(Path(self.cache_url.url) / key)


class CompileCacheFs(CompileCache):
    pass


class CompileCacheS3(CompileCache):
    def __init__(self, cache_url: CacheUrl) -> None:
        raise NotImplementedError("libneuronxla test double: S3 compile cache")


def create_compile_cache(cache_url: CacheUrl) -> CompileCache:
    return CompileCacheS3(cache_url) if cache_url.is_s3() else CompileCacheFs(cache_url)
