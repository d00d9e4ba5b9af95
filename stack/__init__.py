"""The local stack: Mosquitto, PostgreSQL and Redis on loopback for demos and tests."""
