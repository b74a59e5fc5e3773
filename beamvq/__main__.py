"""``python -m beamvq`` runs the same CLI as the ``beamvq`` console script."""

from beamvq.command import console_main

if __name__ == "__main__":
    console_main()
