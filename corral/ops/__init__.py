"""What an operator needs around Corral: generated service units."""
