"""Fixtures live in small plugin modules under tests/fixtures; each says what it yields."""

pytest_plugins = ["fixtures.servers", "fixtures.isolation"]
