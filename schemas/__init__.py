"""The wire contract shared by meters, workers, the bridge and integrators. Imports nothing of ours."""
