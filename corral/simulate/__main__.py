"""``python -m corral.simulate``: same as ``corral simulate``."""

from corral.simulate.command import simulate_command

if __name__ == "__main__":
    simulate_command(prog_name="python -m corral.simulate")
