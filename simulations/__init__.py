"""fedecay simulations package."""
