"""The wire contract shared by meters, workers, the bridge and integrators.

It imports nothing of ours, so every side can depend on it.
"""
