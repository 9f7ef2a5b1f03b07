"""What every layer shares: the errors a user sees, name registries, progress of the long steps, a URL's credentials."""
