"""Input pipeline: grain over ArrayRecord shards, packed into fixed-length rows on the mesh."""
