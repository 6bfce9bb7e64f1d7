"""Python twins of the business rules (docs/business-rules.md): pure functions, no I/O."""
