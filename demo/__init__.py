"""`meterproof demo`: the whole path on one machine, from signed reading to anchored entry."""
