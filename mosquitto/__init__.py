"""Mosquitto broker configuration: templates rendered for the running environment."""
