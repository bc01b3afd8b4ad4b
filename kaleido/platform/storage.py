"""Object storage: a data root, dataset or latent cache at `s3://bucket/prefix`, through fsspec (s3fs).

Stages never write into object storage in place (an S3 "folder" cannot be renamed atomically, and a partial
upload must never look finished). They work in a LOCAL STAGING folder (`staging_folder`: platform.staging, or
$KALEIDO_CACHE/staging) exactly as they do on a local data root, and every finished unit is uploaded with its
marker LAST (`Remote.upload_files(..., last=...)`): a reader trusts a remote shard only when its marker is there,
and checks the files against it (sizes on listing, sha256 on download). A redo deletes the marker first.

Where the endpoint and the credentials come from (never params.yaml for secrets):
- credentials: the standard AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, a profile,
  or the pod's role); region AWS_DEFAULT_REGION / AWS_REGION;
- endpoint: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (MinIO, GCS's S3 interoperability endpoint, a local moto
  server), else `platform.s3_endpoint_url` in params.yaml (an address only), else AWS S3 itself.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
SCHEMES = ("s3://",)


class StorageError(RuntimeError):
    """Object storage refused or failed a request; the message names the object and the fix."""


CREDENTIALS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the pod's role)"
ENDPOINT_KEYS = "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / platform.s3_endpoint_url"


def _error_code(exc: BaseException) -> str:
    """The S3 error code behind `exc` (s3fs turns a botocore ClientError into an OSError and keeps it as the cause)."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
        seen = seen.__cause__ or seen.__context__
    return ""


def is_missing_bucket(exc: BaseException) -> bool:
    """s3fs raises FileNotFoundError both for a missing key and a missing bucket; only the second is a failure."""
    return _error_code(exc) == "NoSuchBucket" or "bucket does not exist" in str(exc)


def why_and_fix(uri: str, exc: BaseException, params: Any = None) -> tuple[str, str]:
    """Why a request to `uri` failed and what to change, from the exception botocore / s3fs raised."""
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    bucket = uri.split("://", 1)[-1].split("/", 1)[0]
    endpoint = endpoint_url(params) or "AWS S3"
    code = _error_code(exc)
    chain = [exc, exc.__cause__, exc.__context__]
    if any(isinstance(e, NoCredentialsError | PartialCredentialsError) for e in chain):
        return "no S3 credentials found", f"set {CREDENTIALS}"
    if any(isinstance(e, EndpointConnectionError) for e in chain):
        return (f"cannot connect to the S3 endpoint {endpoint}",
                f"is it up? check {ENDPOINT_KEYS}")
    if is_missing_bucket(exc):
        return (f"bucket {bucket} does not exist at {endpoint}",
                f"create it (`aws s3 mb s3://{bucket}`) or point the params key (data.root, ...) at an existing one")
    if code == "InvalidAccessKeyId":
        return (f"the endpoint {endpoint} does not know the access key in AWS_ACCESS_KEY_ID",
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to a key pair of that endpoint")
    if code == "SignatureDoesNotMatch":
        return ("the secret key does not match the access key",
                "set AWS_SECRET_ACCESS_KEY to the secret of the key in AWS_ACCESS_KEY_ID")
    if isinstance(exc, PermissionError) or code in ("AccessDenied", "AllAccessDisabled", "InvalidToken",
                                                    "ExpiredToken"):
        return (f"access denied ({code or exc})",
                f"use credentials allowed to read and write s3://{bucket} ({CREDENTIALS})")
    return (f"{exc.__class__.__name__}: {exc}",
            f"check the endpoint ({ENDPOINT_KEYS}), the credentials ({CREDENTIALS}) and that the bucket exists")


def storage_error(uri: str, exc: BaseException, what: str = "", params: Any = None) -> StorageError:
    """One line for a failed request: `s3://bucket/prefix: <why> (<what>); <fix>`."""
    why, fix = why_and_fix(uri, exc, params)
    return StorageError(f"{uri}: {why}{f' ({what})' if what else ''}; {fix}")


def is_remote(location: object) -> bool:
    """True for an object-storage URI (`s3://bucket/prefix`); local paths (str or Path) are False."""
    return isinstance(location, str) and location.startswith(SCHEMES)


def endpoint_url(params: Any = None) -> str | None:
    """The S3 endpoint: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, then platform.s3_endpoint_url (None: AWS S3)."""
    for name in ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    if params is not None:
        return getattr(params.platform, "s3_endpoint_url", None) or None
    return None


def filesystem(uri: str, params: Any = None) -> Any:
    """The fsspec filesystem of `uri` (s3fs for s3://), endpoint per `endpoint_url`, listings never cached (other
    processes write the same prefixes)."""
    import fsspec

    if not is_remote(uri):
        raise ValueError(f"{uri} is not an object-storage URI (s3://bucket/prefix)")
    options: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
    endpoint = endpoint_url(params)
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return fsspec.filesystem("s3", **options)


def staging_folder(uri: str, params: Any = None) -> Path:
    """The local folder a remote location is worked in: <platform.staging or $KALEIDO_CACHE/staging>/<name>-<hash>.

    One folder per URI, so two data roots never share files; it holds what this machine worked on or read (a cache:
    deleting it costs downloads, never data)."""
    from kaleido.platform.integrity import cache_root

    base = None
    if params is not None and getattr(params.platform, "staging", None):
        base = params.resolve(Path(params.platform.staging))
    base = base or cache_root() / "staging"
    tail = uri.split("://", 1)[1].strip("/").replace("/", "_")[-60:]
    return Path(base) / f"{tail}-{hashlib.sha256(uri.encode()).hexdigest()[:10]}"


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from kaleido.platform.progress import Progress

    return Progress(desc, total, "byte", enabled=enabled)


class Remote:
    """A prefix in object storage (`s3://bucket/prefix`) and the few operations the platform needs."""

    def __init__(self, uri: str, params: Any = None) -> None:
        self.uri = uri.rstrip("/")
        self.params = params
        self.fs = filesystem(self.uri, params)
        self.path = self.uri.split("://", 1)[1]  # bucket/prefix, as fsspec names it

    def __repr__(self) -> str:
        return f"Remote({self.uri})"

    def url(self, relative: str = "") -> str:
        return f"{self.uri}/{relative}" if relative else self.uri

    def _key(self, relative: str) -> str:
        return posixpath.join(self.path, relative) if relative else self.path

    def _failed(self, what: str, relative: str, exc: BaseException) -> StorageError:
        return storage_error(self.uri, exc, f"{what} {self.url(relative)}" if relative else what, self.params)

    def glob(self, pattern: str) -> dict[str, dict[str, Any]]:
        """{key: info} of the objects matching `pattern` under this prefix (fsspec glob; {} when none)."""
        try:
            return dict(self.fs.glob(f"{self.path}/{pattern}", detail=True))
        except FileNotFoundError as exc:
            if is_missing_bucket(exc):
                raise self._failed("listing", "", exc) from None
            return {}
        except Exception as exc:
            raise self._failed("listing", "", exc) from None

    def _require_bucket(self) -> None:
        """Raise FileNotFoundError (NoSuchBucket) when this prefix's bucket does not exist."""
        bucket = self.path.split("/", 1)[0]
        self.fs.call_s3("head_bucket", Bucket=bucket)

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist (a bucket the credentials cannot create is an error)."""
        bucket = self.path.split("/", 1)[0]
        try:
            if not self.fs.exists(bucket):
                self.fs.mkdir(bucket)
        except Exception as exc:
            raise self._failed("creating bucket", "", exc) from None

    def listing(self, relative: str = "") -> dict[str, int]:
        """{path relative to this prefix: size} of every object under `relative` (recursive; {} when none)."""
        base = self._key(relative)
        try:
            found = self.fs.find(base, detail=True)
            if not found and relative == "":  # an empty listing of a missing bucket would look like a fresh root
                self._require_bucket()
        except FileNotFoundError as exc:
            if is_missing_bucket(exc):
                raise self._failed("listing", relative, exc) from None
            return {}
        except Exception as exc:
            raise self._failed("listing", relative, exc) from None
        out = {}
        for key, info in found.items():
            if info.get("type", "file") == "file":
                out[posixpath.relpath(key, self.path)] = int(info.get("size") or 0)
        return out

    def exists(self, relative: str) -> bool:
        try:
            return bool(self.fs.exists(self._key(relative)))
        except Exception as exc:
            raise self._failed("checking", relative, exc) from None

    def read_bytes(self, relative: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        try:
            with self.fs.open(self._key(relative), "rb") as handle:
                return handle.read()
        except FileNotFoundError as exc:
            if is_missing_bucket(exc):
                raise self._failed("reading", relative, exc) from None
            return None
        except Exception as exc:
            raise self._failed("reading", relative, exc) from None

    def write_bytes(self, relative: str, data: bytes) -> None:
        try:
            with self.fs.open(self._key(relative), "wb") as handle:
                handle.write(data)
        except Exception as exc:
            raise self._failed("writing", relative, exc) from None

    def open(self, relative: str) -> Any:
        """A seekable read-only file object of the object (ranged reads: a tar's first members cost little)."""
        try:
            return self.fs.open(self._key(relative), "rb", block_size=1 << 20)
        except Exception as exc:
            raise self._failed("opening", relative, exc) from None

    def download(self, relative: str, local: Path) -> Path:
        """Copy one object to `local` (atomically: a temporary name, then a rename)."""
        from kaleido.platform.files import atomic_path

        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(local) as tmp:
                self.fs.get_file(self._key(relative), str(tmp))
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise self._failed("downloading", relative, exc) from None
        return local

    def upload(self, local: Path, relative: str) -> None:
        try:
            self.fs.put_file(str(local), self._key(relative))
        except Exception as exc:
            raise self._failed("uploading to", relative, exc) from None

    def remove(self, relatives: Iterable[str]) -> None:
        keys = [self._key(relative) for relative in relatives]
        if not keys:
            return
        try:
            self.fs.rm(keys)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._failed("deleting", keys[0], exc) from None

    def upload_files(
        self, folder: Path, relative: str, files: Iterable[str], *, last: Iterable[str] = (), progress: bool = False,
    ) -> int:
        """Upload `files` (relative to `folder`) under `relative`, then `last` (the markers), so that a reader that
        sees a marker sees every file it lists. The markers are deleted first: an interrupted re-upload never
        leaves an old marker over new files. Returns the bytes uploaded."""
        last = list(last)
        self.remove([posixpath.join(relative, name) for name in last if self.exists(posixpath.join(relative, name))])
        names = [name for name in files if name not in last]
        total = sum((folder / name).stat().st_size for name in [*names, *last])
        bar = _progress(total, f"upload {relative or self.uri}", progress)
        try:
            for name in [*names, *last]:
                self.upload(folder / name, posixpath.join(relative, name))
                bar.update((folder / name).stat().st_size)
        finally:
            bar.close()
        return total

    def download_files(self, relative: str, folder: Path, names: Mapping[str, int] | Iterable[str]) -> None:
        """Download `names` (relative to `relative`) into `folder`; with sizes given, a size mismatch is an error."""
        sizes = names if isinstance(names, Mapping) else None
        for name in names:
            local = self.download(posixpath.join(relative, name), folder / name)
            if sizes is not None and local.stat().st_size != int(sizes[name]):
                raise StorageError(
                    f"{self.url(posixpath.join(relative, name))} is {local.stat().st_size} bytes, its marker records "
                    f"{sizes[name]}: the object was replaced or cut short; run the stage that writes it again"
                )


def local_location(params: Any, value: str | Path) -> Path:
    """The local folder of a location from params.yaml: itself (resolved) when local, its staging folder when remote."""
    if is_remote(value):
        return staging_folder(str(value), params)
    resolved = params.resolve(Path(value))
    assert resolved is not None
    return resolved


def dvc_remote_commands(dvc: str, name: str, url: str, params: Any = None) -> list[list[str]]:
    """The `dvc` commands that make `url` this workspace's default remote (written to .dvc/config.local, never
    committed), with the S3 endpoint when one is configured, and with verification on: `verify` makes `dvc pull` /
    `dvc fetch` re-hash what they download (a corrupted remote object fails the pull instead of reaching the
    workspace with exit 0), `cache.verify` re-hashes what enters the local cache. Credentials come from the AWS
    variables / profile / role, as for every other S3 client of the platform."""
    commands = [
        [dvc, "remote", "add", "--local", "--force", "--default", name, url],
        [dvc, "remote", "modify", "--local", name, "verify", "true"],
        [dvc, "config", "--local", "cache.verify", "true"],
    ]
    endpoint = endpoint_url(params)
    if is_remote(url) and endpoint:
        commands.insert(1, [dvc, "remote", "modify", "--local", name, "endpointurl", endpoint])
    return commands
