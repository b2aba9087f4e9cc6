"""The command lines (`lima-train`, `lima-evaluate`, ...): absl flags, one-line errors, exit 2 on bad input."""
