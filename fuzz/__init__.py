"""Hostile-input fuzzing of the worker's decode -> verify -> judge path (`meterproof fuzz`)."""
