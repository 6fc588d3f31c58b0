"""fedecay client package."""
