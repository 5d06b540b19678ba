"""``python -m ditfleet ...`` (what ``torchrun --nproc-per-node N -m ditfleet ...`` runs)."""

from .cli import entry

if __name__ == "__main__":
    entry()
