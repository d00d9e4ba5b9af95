"""Who may see a meter's data: integrators, owner consents and the one policy that decides."""
