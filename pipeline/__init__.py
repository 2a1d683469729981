"""Planner, Python API, CLI, local runner and embedded FTP mirrors."""
