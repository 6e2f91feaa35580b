"""The train phase: the QLoRA recipe (training), its planning, collation, callbacks, launch,
checkpoints and the memory preflight; `fast/` holds the fast path."""
