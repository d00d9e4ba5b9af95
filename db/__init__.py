"""The PostgreSQL schema: versioned plain-SQL migrations and the `meterproof db` command."""
