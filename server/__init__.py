"""fedecay server package."""
