"""``python -m beamvq`` runs the same CLI as the ``beamvq`` console script."""

from beamvq.cli import main

if __name__ == "__main__":
    main()
