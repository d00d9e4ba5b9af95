"""`meterproof conformance`: does a meter, or a capture of what it sent, follow the wire
spec (docs/spec/reading-v1.md)? A verdict per check, and the reasons when one fails."""
