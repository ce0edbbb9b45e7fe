"""Many devices and hosts: meshes and logical-axis rules (`sharding`), multi-host start (`cluster`, `rendezvous`).
Built on :mod:`jaxind.models` only (docs/DESIGN.md §2)."""
