"""Dataset preparation commands: align faces, build TFRecords, unpack RecordIO, prepare MegaFace.

Each module is a thin command line over `sparse_embed.data` and `sparse_embed.faces`, run as
`python -m sparse_embed.preprocessing.<name>` or its console script `sparse-embed-<name>`
(underscores as dashes); `preprocessing/<name>.py` in a clone forwards to the same command.
"""
