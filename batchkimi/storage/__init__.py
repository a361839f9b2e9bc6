"""Data where it lives: URLs of object stores (``s3://``, ``gs://``, ``az://``, ``hf://``) and
the local copies batchkimi works on.

Owns: turning a URL into a filesystem (fsspec's, with each store's own credential chain), the
one-line errors for a scheme it cannot reach, and :class:`~.remote.RemoteFolder`: a local
working copy of a remote folder, pulled and pushed as whole objects, under a lock that works
on object storage. Imports nothing of batchkimi's but ``errors`` and ``files``.
"""
