"""fedecay common package."""
