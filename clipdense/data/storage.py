"""Where a stage reads and writes: a URI (local path or s3://bucket/prefix) bound to its S3 endpoint.

The one module that builds pyarrow filesystems. A stage's entry resolves each location once, `Storage` values
travel down (and pickle to Ray workers: the filesystem is rebuilt from uri + endpoint where it is used), and no
module below passes an endpoint string along. Config sections that name a location inherit `StorageKeys`, the one
place the `s3_endpoint` key is declared.
"""
from __future__ import annotations

import functools
import os
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs
from pydantic import Field

from clipdense.config import Config, DataError


@functools.lru_cache(maxsize=16)  # an S3FileSystem is costly to build; (uri scheme, endpoint, env) decides it
def _s3(endpoint: str | None, access: str | None, secret: str | None, region: str | None) -> pafs.FileSystem:
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        kwargs = {"endpoint_override": host or endpoint, "scheme": scheme or "http"}
    if access and secret:
        # explicit keys travel with the pickled filesystem to Ray workers whose env may lack them
        kwargs["access_key"], kwargs["secret_key"] = access, secret
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class Storage:
    """A location and how to reach it. `endpoint` (else env AWS_ENDPOINT_URL) is an S3-compatible server."""
    uri: str
    endpoint: str | None = None

    def __post_init__(self):
        scheme = self.uri.split("://", 1)[0] if "://" in self.uri else None
        if scheme not in (None, "s3"):   # else `gs://b/x` would silently become the local folder ./gs:/b/x
            raise DataError(f"{self.uri}: {scheme}:// is not supported; use a local path or s3:// (an S3-compatible "
                            "endpoint reaches other stores)")

    @property
    def remote(self) -> bool:
        return self.uri.startswith("s3://")

    @functools.cached_property
    def fs(self) -> pafs.FileSystem:
        """The pyarrow filesystem this location lives on (what Ray Data, Train and Tune take)."""
        if self.remote:
            env = os.environ.get
            return _s3(self.endpoint or env("AWS_ENDPOINT_URL"), env("AWS_ACCESS_KEY_ID"),
                       env("AWS_SECRET_ACCESS_KEY"), env("AWS_DEFAULT_REGION") or env("AWS_REGION"))
        return pafs.LocalFileSystem()

    @property
    def path(self) -> str:
        """The location within `fs`: `bucket/prefix` for s3://, an absolute path for a local one."""
        return self.uri[len("s3://"):] if self.remote else os.path.abspath(self.uri)

    def at(self, uri: str) -> Storage:
        """Another location on the same endpoint (a file found under this one, a sibling folder)."""
        return Storage(uri, self.endpoint)

    def child(self, name: str) -> Storage:
        return self.at(posixpath.join(self.uri.rstrip("/"), name))

    def file_names(self) -> set[str]:
        """Base names of the files directly in this folder (none if it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path.rstrip("/"), recursive=False, allow_not_found=True))
        return {posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File}

    def open_input_file(self):
        """This file for random access (a Parquet footer, a column)."""
        return self.fs.open_input_file(self.path)

    def open_output_stream(self):
        """This file, written from the start; its parent folder is made first."""
        self.fs.create_dir(posixpath.dirname(self.path), recursive=True)
        return self.fs.open_output_stream(self.path)

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def open_input_stream(self):
        """This file, read from the start."""
        return self.fs.open_input_stream(self.path)


class StorageKeys(Config):
    """Mixed into every config section that names a location: the endpoint key, declared once."""
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint (http://host:port) for s3:// "
                                    "locations; else env AWS_ENDPOINT_URL, else AWS S3")

    def storage(self, uri: str) -> Storage:
        return Storage(uri, self.s3_endpoint)
