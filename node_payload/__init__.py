"""What runs on an execute node: fetch a local dataset from FTP mirrors, train, return an update.

The code every package shares (errors, run layout, run config, tensor files, models, manifest)
is the kernel in `node_payload.common`.
"""
