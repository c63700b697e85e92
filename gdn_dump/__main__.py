"""``python -m gdn_dump`` (what ``torchrun -m gdn_dump extract ...`` runs)."""

from .cli import main

main()
