"""One path layer for local and remote (gs://) files: etils.epath, atomic uploads, local staging."""
import hashlib
import os
import shutil
import tempfile
import uuid

from etils import epath

CHUNK = 16 << 20


def is_remote(path) -> bool:
  """True for URLs (gs://, s3://, ...): these go through epath/fsspec, never os.path."""
  return "://" in os.fspath(path)


def as_path(path) -> epath.Path:
  return epath.Path(path)


def join(base, *parts) -> str:
  """os.path.join for local paths; a URL join (no abspath, no `gs:` folder) for remote ones."""
  base = os.fspath(base)
  if is_remote(base):
    return str(epath.Path(base).joinpath(*parts))
  return os.path.join(base, *parts)


def absolute(path) -> str:
  """os.path.abspath for local paths; remote paths unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def exists(path) -> bool:
  return epath.Path(path).exists()


def is_dir(path) -> bool:
  return epath.Path(path).is_dir()


def is_file(path) -> bool:
  return epath.Path(path).is_file()


def makedirs(path) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def upload(local: str, remote: str) -> str:
  """Copies a finished local file to `remote`: first under a dot-temp name beside it, then copied
  server-side to the final name (an object store's rename), so no reader ever sees a partial object
  under the final name; an interrupted upload leaves only `.tmp-*`."""
  dst = epath.Path(remote)
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = dst.parent / f".tmp-{uuid.uuid4().hex}-{dst.name}"
  try:
    with open(local, "rb") as src, tmp.open("wb") as out:
      shutil.copyfileobj(src, out, CHUNK)
    move(str(tmp), str(dst))
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise
  return str(dst)


def move(src: str, dst: str) -> str:
  """Renames src to dst. On an object store: a server-side copy (the object appears whole) then a
  delete of src; gcsfs's own rename first tries an API that emulators lack."""
  if not is_remote(src) and not is_remote(dst):
    os.replace(src, dst)
    return dst
  epath.Path(src).copy(dst, overwrite=True)
  epath.Path(src).unlink()
  return dst


def remove(path: str) -> None:
  epath.Path(path).unlink(missing_ok=True)


def write_local(path: str, write, mode: str = "wb") -> str:
  """Calls write(f) on a temp file beside the local `path`, then renames it over `path`: readers
  never see a half-written file, and a crash leaves only a dot-temp file behind."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.splitext(path)[1])
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def download(remote: str, local: str) -> str:
  """Copies `remote` to the local file `local` through a temp file and rename (atomic locally)."""
  def copy(out):
    with epath.Path(remote).open("rb") as src:
      shutil.copyfileobj(src, out, CHUNK)
  return write_local(local, copy)


def cache_dir() -> str:
  """Where remote inputs are staged on this host: $OVENC_CACHE_DIR, else a folder in the temp dir."""
  return os.environ.get("OVENC_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "ovenc-cache")


def _stage_key(path: str) -> tuple[epath.Path, str]:
  p = epath.Path(path)
  st = p.stat()
  return p, hashlib.sha256(f"{path}|{st.length}|{st.mtime}".encode()).hexdigest()[:24]


def upload_staged(local: str, remote: str, cache: str | None = None) -> str:
  """Uploads a finished local file to `remote` (atomically, as upload) and moves the local file to
  where stage(remote) looks for it, so this host reads it back without downloading it. Returns
  that local path."""
  upload(local, remote)
  p, key = _stage_key(remote)
  staged = os.path.join(cache or cache_dir(), key, p.name)
  os.makedirs(os.path.dirname(staged), exist_ok=True)
  shutil.move(local, staged)
  return staged


def stage(path, cache: str | None = None) -> str:
  """A local file with `path`'s bytes: local paths as they are; a remote file is downloaded once per
  host into the cache (keyed by URL, size and mtime, so a rewritten object is fetched again). Readers
  that need a local file (ArrayRecord, np.load with mmap) call this."""
  path = os.fspath(path)
  if not is_remote(path):
    return path
  p, key = _stage_key(path)
  local = os.path.join(cache or cache_dir(), key, p.name)
  if not os.path.isfile(local):
    download(path, local)
  return local


def walk_files(path) -> list[str]:
  """Every file under the folder `path`, at any depth, sorted (epath's rglob refuses remote paths;
  its walk on gs:// yields roots without the scheme, so paths are rebuilt from `path`)."""
  path = os.fspath(path).rstrip("/")
  top = str(epath.Path(path))
  out = []
  for root, _, names in epath.Path(path).walk():
    rel = os.path.relpath(str(root), top.split("://", 1)[-1] if is_remote(path) else top)
    out += [join(path, name) if rel == "." else join(path, rel, name) for name in names]
  return sorted(out)


def stage_dir(path, cache: str | None = None) -> str:
  """A local folder with the files under `path` (recursively): local paths as they are; a remote
  folder is downloaded once per host into the cache, keyed by URL and every file's name, size and
  mtime, and marked complete last (for readers such as transformers' from_pretrained)."""
  path = os.fspath(path)
  if not is_remote(path):
    return path
  root = epath.Path(path)
  if not root.is_dir():
    raise FileNotFoundError(f"{path} is not a folder")
  files = [(os.path.relpath(f, path), epath.Path(f)) for f in walk_files(path)]
  stats = [(rel, f.stat()) for rel, f in files]
  key = hashlib.sha256(repr([path] + [(r, s.length, s.mtime) for r, s in stats]).encode()).hexdigest()[:24]
  local = os.path.join(cache or cache_dir(), key, root.name)
  done = os.path.join(cache or cache_dir(), key, ".complete")
  if not os.path.isfile(done):
    for rel, f in files:
      download(str(f), os.path.join(local, rel))
    os.makedirs(local, exist_ok=True)
    open(done, "w").close()
  return local


def check_writable(path, what: str = "folder") -> None:
  """Fails fast, creating nothing: a remote folder must take a probe object (written, then deleted);
  a local one must be a writable folder or not exist yet below a writable folder. One-line
  ValueError naming the path (no credentials, missing bucket, read-only or not a folder)."""
  path = os.fspath(path)
  if not is_remote(path):
    p = os.path.abspath(path)
    while not os.path.exists(p):
      p = os.path.dirname(p)
    if not os.path.isdir(p):
      raise ValueError(f"{what} {path} is not writable: {p} is not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
      raise ValueError(f"{what} {path} is not writable: no write permission on {p}")
    return
  if path.startswith("gs://"):
    _check_gcs_credentials(path, what)
  probe = epath.Path(path) / f".write-probe-{uuid.uuid4().hex}"
  try:
    probe.write_bytes(b"")
    probe.unlink()
  except Exception as e:  # the backends raise many kinds (OSError, HttpError, auth errors)
    bucket = "/".join(path.split("/")[:3])
    if isinstance(e, FileNotFoundError) and not _exists_quietly(bucket):
      raise ValueError(f"{what} {path}: bucket {bucket} does not exist") from None
    reason = " ".join(str(e).split())[:300] or type(e).__name__
    raise ValueError(f"{what} {path} is not writable: {type(e).__name__}: {reason}") from None


def _exists_quietly(path: str) -> bool:
  try:
    return epath.Path(path).exists()
  except Exception:  # the question was asked to word an error; the first error is the one to report
    return True


def _check_gcs_credentials(path: str, what: str) -> None:
  """Without credentials gcsfs would fall back to anonymous access and retry for about a minute:
  ask google.auth first (an emulator, STORAGE_EMULATOR_HOST, needs none)."""
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    return
  try:
    import gcsfs  # noqa: F401  (etils.epath reaches gs:// through it)
    import google.auth
    from google.auth import exceptions
  except ImportError:
    raise ValueError(f"{what} {path}: gs:// paths need gcsfs (pip install 'ovenc-jax[gcs]')") from None
  try:
    google.auth.default()
  except exceptions.DefaultCredentialsError:
    raise ValueError(f"{what} {path}: no Google Cloud credentials on this host (run `gcloud auth "
                     f"application-default login`, or use a VM service account; STORAGE_EMULATOR_HOST "
                     f"for an emulator)") from None
