"""``python -m srtrain`` (what ``torchrun ... -m srtrain`` runs): the srtrain command."""
from .cli import main

if __name__ == "__main__":
    main(prog_name="srtrain")
