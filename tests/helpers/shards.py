"""Shard folders as the tests compare them: every record's raw bytes, in a fixed order."""
from array_record.python import array_record_module

from ovenc_format import records


def raw_records(folder) -> list[bytes]:
  """The raw bytes of every record in the folder's shards, sorted (shard order is the runner's)."""
  out = []
  for path in records.list_shards(str(folder)):
    reader = array_record_module.ArrayRecordReader(path)
    out.extend(reader.read_all())
    reader.close()
  return sorted(out)
