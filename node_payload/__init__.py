"""What runs on an execute node: fetch a local dataset from FTP mirrors, train, return an update.

Also the small library the planner and the aggregator share with the node (manifest, sampling,
models, tensor files), because it is the part that ships to machines without dagtrain installed.
"""
