"""Studies: thin drivers that turn arms (tables of small dataclasses) into normal training runs
plus evaluations, and write their reports. The library never imports this package."""
