"""Operator PKI: root CA, broker and device certificates, revocation, signing keys."""
